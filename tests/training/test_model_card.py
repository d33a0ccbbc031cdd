"""training/model_card.py: the card text from a plain dict, the final metrics from a log history, the
fingerprints of an aligned folder."""

import json

from gold_pipeline.training.model_card import build_model_card, data_source, final_metrics, loss_description

SHA_DATA = "ab" * 32
SHA_STUDENT_TOK = "cd" * 32


def _info(**overrides):
    info = {
        "model_name": "my-student",
        "student": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "tokenizer": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "sha256": SHA_STUDENT_TOK,
                                  "vocab_size": 49152}},
        "teacher": {"model": "pkg:qwen2.5-coder-0.5b-instruct",
                    "tokenizer": {"name": "pkg:qwen2.5-coder-0.5b-instruct", "sha256": "ef" * 32,
                                  "vocab_size": 151665}},
        "settings": {"use_uld_loss": True, "uld_use_hybrid_loss": True, "lmbda": 0.25, "beta": 0.5,
                     "temperature": 0.9, "uld_hybrid_matched_weight": None, "uld_hybrid_unmatched_weight": None,
                     "max_steps": 200, "learning_rate": 2e-5, "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 8, "use_peft": False, "lora_r": 16},
        "world_size": 2,
        "data": [{"role": "train", "kind": "aligned shards", "source": "data/aligned",
                  "fingerprint": {"manifest_sha256": "12" * 32, "num_rows": 52,
                                  "source": {"kind": "files", "split": "train",
                                             "files": [{"path": "data/train.jsonl", "sha256": SHA_DATA,
                                                        "bytes": 12613, "mtime_ns": 1}]}}}],
        "metrics": {"train_loss": 0.4321, "global_step": 200, "eval_bits_per_byte": 3.35},
        "versions": {"gold": "0.1.0"},
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    info.update(overrides)
    return info


def test_card_names_models_tokenizers_method_data_and_metrics():
    card = build_model_card(_info())
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\nlibrary_name: transformers")
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in front and "- knowledge-distillation" in front
    assert body.lstrip().startswith("# my-student")
    assert ("| student | `HuggingFaceTB/SmolLM2-135M-Instruct` | `HuggingFaceTB/SmolLM2-135M-Instruct` | 49152 | "
            f"`{SHA_STUDENT_TOK}` |") in card
    assert "| teacher | `pkg:qwen2.5-coder-0.5b-instruct` |" in card and "151665" in card
    assert "GOLD hybrid loss: generalized JSD (beta=0.5)" in card and "adaptive weights" in card
    assert "On-policy share lmbda=0.25" in card and "| temperature | 0.9 |" in card
    assert "| learning_rate | 2e-05 |" in card and "| rows per optimizer step | 64 |" in card  # 4 x 8 x 2
    assert "lora_r" not in card  # LoRA settings only when use_peft
    assert "- train: aligned shards `data/aligned`" in card
    assert f"- `data/train.jsonl`: sha256 `{SHA_DATA}`, 12613 bytes" in card and "manifest_sha256" in card
    assert "| train_loss | 0.4321 |" in card and "| eval_bits_per_byte | 3.35 |" in card


def test_card_of_a_lora_run_without_hub_metadata_or_metrics():
    info = _info(base_model=None, metrics={}, data=[])
    info["settings"] = {**info["settings"], "use_peft": True, "use_uld_loss": False, "uld_crossentropy_weight": 0.1}
    card = build_model_card(info)
    assert "library_name: peft" in card and "base_model" not in card
    assert "| lora_r | 16 |" in card
    assert "generalized JSD (beta=0.5), token by token" in card and "plus 0.1 x cross-entropy" in card
    assert "(no metrics logged)" in card and "(not recorded)" in card


def test_loss_description_with_fixed_hybrid_weights():
    text = loss_description({"use_uld_loss": True, "uld_use_hybrid_loss": True, "beta": 0.1,
                             "uld_hybrid_matched_weight": 0.7, "uld_hybrid_unmatched_weight": 0.3})
    assert "weights 0.7 (matched) / 0.3 (unmatched)" in text


def test_final_metrics_from_the_log_history():
    history = [
        {"loss": 2.0, "matched_loss": 1.5, "learning_rate": 1e-4, "epoch": 0.5, "step": 1},
        {"eval_loss": 1.9, "eval_bits_per_byte": 4.0, "epoch": 0.5, "step": 1},
        {"loss": 1.0, "matched_loss": 0.75, "on_policy_share": 0.5, "grad_norm": 3.0, "epoch": 1.0, "step": 2},
        {"train_runtime": 12.5, "train_loss": 1.5, "train_samples_per_second": 3.0, "epoch": 1.0, "step": 2},
    ]
    assert final_metrics(history) == {"loss": 1.0, "matched_loss": 0.75, "on_policy_share": 0.5,
                                      "last_logged_step": 2, "train_loss": 1.5, "train_runtime": 12.5,
                                      "train_samples_per_second": 3.0, "global_step": 2, "eval_loss": 1.9,
                                      "eval_bits_per_byte": 4.0}
    assert final_metrics([]) == {}


def test_data_source_of_an_aligned_folder_reads_its_manifest(tmp_path):
    from gold_pipeline.align.config import AlignConfig
    from gold_pipeline.align.job import run_align
    from gold_pipeline.data.shards import file_sha256
    from tests.helpers import CONVERSATIONS, STUDENT_TOKENIZER, TEACHER_TOKENIZER

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS[:3]))
    out = tmp_path / "aligned"
    run_align(AlignConfig(out=str(out), dataset=str(rows), student_tokenizer=STUDENT_TOKENIZER,
                          teacher_tokenizer=TEACHER_TOKENIZER))
    source = data_source(str(out), role="train", aligned=True)
    assert source["kind"] == "aligned shards" and source["fingerprint"]["num_rows"] == 3
    assert source["fingerprint"]["manifest_sha256"] == file_sha256(out / "manifest.json")
    assert source["fingerprint"]["source"]["files"][0]["sha256"] == file_sha256(rows)
    raw = data_source(str(rows), role="eval")
    assert raw["kind"] == "dataset (files)" and raw["fingerprint"]["files"][0]["sha256"] == file_sha256(rows)
