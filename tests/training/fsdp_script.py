"""Run by tests/training/test_fsdp.py: one GOLD loss + SGD step on a tiny student, either as one process on the
whole batch ("single") or under `torchrun --nproc_per_node 2` with the student sharded by torch FSDP2
`fully_shard` over gloo ("fsdp"), each rank holding half the rows. The teacher is replicated (not wrapped), as in
the trainer. Rank 0 writes the loss, the full gradients and the updated weights to result.pt.

The loss path follows GOLDTrainer.compute_loss: hidden states + LM head for an unsharded student, the forward through
the root module (`forward_completion_logits`) for a sharded one (models.sharding.is_sharded), `distillation_loss`
with the window counts summed over ranks, times the world size because FSDP2 averages gradients. Under FSDP the
script also records that the hidden-states path fails on a sharded student (why the trainer checks), and samples
with the sharded student while rank 0 stops after one token and rank 1 runs on (synced generation)."""

import os
import sys

import torch
import torch.distributed as dist

from gold_pipeline.losses import vocab_split
from gold_pipeline.models.generation import SamplingSettings, generate_seeded
from gold_pipeline.models.sharding import is_sharded
from gold_pipeline.text.pair import TokenizerPair
from gold_pipeline.text.vocab_map import cached_vocab_map
from gold_pipeline.training import loss as gold_loss
from gold_pipeline.training.collate import collate_rows
from gold_pipeline.training.datasets import build_dataset
from tests.helpers import CONVERSATIONS, STUDENT_TOKENIZER, TEACHER_TOKENIZER, gold_args, tiny_model, tokenizer

ROWS = 4
LR = 0.5


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered to the full tensor (a plain tensor as is)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _rows_path_error(student, batch, width: int) -> str:
    try:
        gold_loss.forward_completion_rows(student, batch, vocab_size=width).head(torch.zeros(1, 16))
    except RuntimeError as error:
        return str(error)
    return ""


def _generate_unevenly(student, pair, rank: int) -> list[tuple[int, str]]:
    """Sampled lengths and finish reasons of every rank: rank 0 stops at its first token (every id is a stop id),
    rank 1 samples 4 tokens. Without synced generation rank 1's next forward would wait for rank 0 forever."""
    stop = list(range(pair.student_vocab_size)) if rank == 0 else []
    ids, finish = generate_seeded(student, [[1, 5, 7]], [rank], SamplingSettings(max_new_tokens=4),
                                  stop_ids=stop, pad_id=pair.student_pad_id)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (len(ids[0]), finish[0]))
    return gathered


def main(out_dir: str, mode: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    world, rank = 1, 0
    if mode == "fsdp":
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    pair = TokenizerPair.build(tokenizer(STUDENT_TOKENIZER), tokenizer(TEACHER_TOKENIZER))
    args = gold_args(out_dir)
    data = build_dataset(CONVERSATIONS, pair, max_completion_length=args.max_completion_length,
                         max_length=args.max_length, what="train_dataset")
    per_rank = ROWS // world
    rows = [data[i] for i in range(rank * per_rank, (rank + 1) * per_rank)]
    student, teacher = tiny_model(STUDENT_TOKENIZER, 0), tiny_model(TEACHER_TOKENIZER, 1)
    teacher.eval().requires_grad_(False)  # replicated on every rank: frozen, no optimizer state
    student_width = min(student.get_input_embeddings().weight.shape[0], pair.student_vocab_size)
    teacher_width = min(teacher.get_input_embeddings().weight.shape[0], pair.teacher_vocab_size)
    settings = gold_loss.LossSettings.from_args(args, student_width, teacher_width)
    mapping = cached_vocab_map(pair.student_table, pair.teacher_table)
    keep = (mapping[:, 0] < student_width) & (mapping[:, 1] < teacher_width)
    vmap = vocab_split(mapping[keep], student_width, teacher_width)
    names = [name for name, _ in student.named_parameters()]

    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)

    batch = collate_rows(rows, pair)
    counts = gold_loss.window_counts(batch, seq_kd=False, use_uld_loss=True)
    window = torch.tensor([counts[k] for k in gold_loss.WINDOW_KEYS], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(window)
    window = {k: window[i].to(torch.float32) for i, k in enumerate(gold_loss.WINDOW_KEYS)}

    if is_sharded(student):
        student_out = gold_loss.forward_completion_logits(student, batch, vocab_size=student_width)
    else:
        student_out = gold_loss.forward_completion_rows(student, batch, vocab_size=student_width)
    with torch.no_grad():
        teacher_rows = gold_loss.forward_completion_rows(teacher, batch, prefix="teacher_", vocab_size=teacher_width)
    loss, _ = gold_loss.distillation_loss(student_out, {"rows": teacher_rows}, batch, settings, window, vmap)
    (loss * world).backward()
    grads = {name: _full(p.grad).detach().clone() for name, p in zip(names, student.parameters())}
    optimizer.step()
    weights = {name: _full(p.detach()).clone() for name, p in zip(names, student.parameters())}
    total = loss.detach().clone()
    result = {"world_size": world, "grads": grads, "weights": weights, "sharded": is_sharded(student)}
    if world > 1:
        dist.all_reduce(total)
        result["rows_path_error"] = _rows_path_error(student, batch, student_width)
        result["generated"] = _generate_unevenly(student, pair, rank)
    result["loss"] = float(total)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
