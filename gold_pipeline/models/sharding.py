"""Sharded training (FSDP2, DeepSpeed ZeRO-3): what the trainer must know about a sharded student and the one
placement rule of the frozen teacher. The sharding itself is accelerate's (configs/accelerate/*.yaml);
docs/scaling.md explains the choices.

- The student may be sharded. A student sharded in place (FSDP2 `fully_shard` keeps the module object, so
  `accelerator.unwrap_model(model) is model`) must still take the forward through its root module: calling the
  decoder and the LM head separately skips the root's all-gather (DTensor/plain-tensor mix error).
- The teacher is replicated: every rank holds all of its weights, in eval mode, without gradients (so no optimizer
  state and no gradient traffic). A teacher partitioned at load time (DeepSpeed `zero3_init_flag: true`) or left on
  the meta device (FSDP `fsdp_cpu_ram_efficient_loading: true` on ranks > 0) has no usable weights outside an
  engine, and is refused with the config key to change.
"""

from __future__ import annotations

import torch

from gold_pipeline.errors import GoldInputError


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are split across processes: FSDP2 `fully_shard` (DTensor parameters) or
    DeepSpeed ZeRO-3 (partitioned parameters carry `ds_id`)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return True
    return any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in model.parameters())


def place_teacher(teacher: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """The frozen teacher, replicated on this rank: on `device`, eval mode, no gradients. Refuses a teacher whose
    weights are partitioned or on the meta device (see the module docstring)."""
    if any(hasattr(p, "ds_id") for p in teacher.parameters()):
        raise GoldInputError(
            "The teacher model was partitioned by DeepSpeed ZeRO-3 when it was loaded (zero3_init_flag: true), but "
            "gold keeps the frozen teacher replicated on every rank: set zero3_init_flag: false in the accelerate "
            "config (as configs/accelerate/deepspeed_zero3.yaml does)."
        )
    if is_sharded(teacher):
        raise GoldInputError("The teacher model is sharded (FSDP); gold keeps the frozen teacher replicated on every "
                             "rank: pass an unwrapped teacher.")
    meta = [name for name, p in teacher.named_parameters() if p.is_meta]
    if meta:
        raise GoldInputError(
            f"The teacher model has {len(meta)} parameter(s) on the meta device (e.g. {meta[0]}): it was loaded "
            f"without weights, as transformers does on ranks > 0 with fsdp_cpu_ram_efficient_loading: true. gold "
            f"keeps the frozen teacher replicated: set fsdp_cpu_ram_efficient_loading: false in the accelerate "
            f"config (as configs/accelerate/fsdp2.yaml does)."
        )
    return teacher.to(device).eval().requires_grad_(False)


def synced_generation(model: torch.nn.Module) -> bool:
    """Whether `generate` must keep stepping until every rank finished (`synced_gpus`): when the model is sharded
    across processes, each forward is a collective, and ranks whose samples stop at different lengths would hang."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)
