"""`gold teacher-cache --executor ray`: an actor pool (each actor loads the teacher backend once), one task per
unfinished shard. An actor runs the local workers' code (`job._ShardProducer`: the shard and its completion marker
written atomically by the actor); the driver prepares the folder, picks the unfinished shards and writes the
manifest last (job.run_teacher_cache)."""

from __future__ import annotations

import os
from typing import Any

from gold_pipeline.cluster import ray_failure, ray_session
from gold_pipeline.teacher_cache.config import TeacherCacheConfig


class TeacherShardWorker:
    """The Ray actor: one backend, many shards."""

    def __init__(self, cfg: TeacherCacheConfig, rank: int):
        import ray
        import torch

        from gold_pipeline.teacher_cache.job import _ShardProducer, load_teacher_tokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.producer = _ShardProducer(cfg, load_teacher_tokenizer(cfg), rank)

    def produce(self, s: int) -> dict[str, int]:
        return self.producer.produce(s)


def actor_options(cfg: TeacherCacheConfig, cluster_gpus: float) -> dict[str, Any]:
    """Resources of one actor: a CPU, plus its GPUs (vllm: one tensor-parallel group) when the cluster has any and
    the run is not pinned to the CPU (the openai backend only sends requests)."""
    options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0, "max_task_retries": 0}
    if cfg.backend != "openai" and cfg.device != "cpu" and cluster_gpus >= 1:
        options["num_gpus"] = cfg.tensor_parallel_size if cfg.backend == "vllm" else 1
    return options


def run_shards_on_ray(cfg: TeacherCacheConfig, shards: list[int]) -> None:
    """Produce `shards` on min(num_workers, len(shards)) actors; a lost actor or a failed shard stops the run
    resumably (WorkerFailedError), a GoldError raised in an actor is re-raised as it is."""
    if not shards:
        return
    from gold_pipeline.progress import RateProgress

    with ray_session(cfg.ray_address, cfg.num_workers) as ray:
        from ray.util import ActorPool

        options = actor_options(cfg, ray.cluster_resources().get("GPU", 0))
        actor = ray.remote(**options)(TeacherShardWorker)
        pool = ActorPool([actor.remote(cfg, rank) for rank in range(min(cfg.num_workers, len(shards)))])
        label = f"teacher-cache[{cfg.backend}] ray x{min(cfg.num_workers, len(shards))}"
        with RateProgress(label, total=None, disable=not cfg.progress or None) as progress:
            try:
                for done in pool.map_unordered(lambda worker, s: worker.produce.remote(s), shards):
                    progress.advance(rows=done["rows"], tokens=done["tokens"])
            except Exception as error:
                raise ray_failure(error, "teacher-cache") from None
