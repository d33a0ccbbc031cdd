"""Run by tests/training/test_multiprocess.py, once under `accelerate launch --num_processes 2` (gradient
accumulation 1) and once as one process (accumulation 2): writes losses, grad norms and weights to JSON."""

import json
import sys

import torch

from tests.helpers import make_trainer, train_losses


def main(out_dir: str, accumulation: int, lmbda: float) -> None:
    trainer = make_trainer(out_dir, gradient_accumulation_steps=accumulation, max_steps=2, lmbda=lmbda,
                           metrics_jsonl=None, ddp_backend="gloo" if accumulation == 1 else None)
    trainer.train()
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = {
            "losses": train_losses(trainer),
            "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
            "weights": {name: p.detach().double().sum().item() for name, p in model.named_parameters()},
            "lm_head": model.lm_head.weight.detach()[:50].flatten().tolist(),
            "world_size": trainer.accelerator.num_processes,
        }
        with open(f"{out_dir}/result.json", "w") as handle:
            json.dump(result, handle)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
