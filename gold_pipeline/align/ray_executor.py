"""`gold align --executor ray`: one Ray task per shard. Each task runs the local worker's code
(`job._init_worker` once per Ray worker process, then `job._worker_shard`: the shard and its completion marker
written atomically by the worker); the driver keeps the shard loop, the resume skips and the manifest."""

from __future__ import annotations

from typing import Any

from gold_pipeline.align import job
from gold_pipeline.align.config import AlignConfig
from gold_pipeline.cluster import RayShardQueue, ray_session
from gold_pipeline.text.pair import TokenizerSpec


def _ray_align_shard(setup: tuple[TokenizerSpec, TokenizerSpec, AlignConfig], index: int, span: tuple[int, int],
                     items: list) -> dict[str, Any]:
    if job._WORKER.get("setup") != setup:  # a Ray worker process serves many shards (and maybe other runs)
        job._init_worker(*setup)
        job._WORKER["setup"] = setup
    return job._worker_shard(index, span, items)


class RayShards(job._Executor):
    """The align executor of --executor ray: shard tasks on a Ray cluster, at most 2 x --num-workers in flight."""

    def __init__(self, student_spec: TokenizerSpec, teacher_spec: TokenizerSpec, cfg: AlignConfig):
        self.setup = (student_spec, teacher_spec, cfg)
        self.session = ray_session(cfg.ray_address, cfg.num_workers)
        self.limit = 2 * cfg.num_workers

    def __enter__(self) -> RayShards:
        ray = self.session.__enter__()
        self.queue = RayShardQueue(ray, self.limit, "align")
        try:
            self.task = ray.remote(num_cpus=1, max_retries=0)(_ray_align_shard)
            self.setup_ref = ray.put(self.setup)  # tokenizer specs + config, shipped once for all tasks
        except BaseException:
            self.session.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.queue.cancel()
        finally:
            self.session.__exit__(*exc)

    def submit(self, index: int, span: tuple[int, int], chunk: list) -> list[tuple[int, dict]]:
        return self.queue.add(self.task.remote(self.setup_ref, index, span, chunk), len(chunk))

    def drain(self) -> list[tuple[int, dict]]:
        return self.queue.drain()
