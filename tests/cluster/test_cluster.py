"""gold_pipeline.cluster without a cluster: joining one that never answers ends in bounded time with an error
naming it; what Ray raises becomes gold's errors."""

import threading
import time

import pytest

from gold_pipeline import cluster
from gold_pipeline.errors import ClusterUnreachableError, GoldInputError, WorkerFailedError


class _NeverAnswers:
    __version__ = "2.60.0"

    def __init__(self):
        self.release = threading.Event()

    def init(self, **options):
        self.release.wait(30)


def test_a_cluster_that_never_answers_times_out_naming_it():
    ray = _NeverAnswers()
    started = time.monotonic()
    with pytest.raises(ClusterUnreachableError, match="10.1.2.3:6379 did not accept this driver within 1 s"):
        cluster._init_within(ray, 1.0, "10.1.2.3:6379", address="10.1.2.3:6379")
    assert time.monotonic() - started < 5
    ray.release.set()


def test_ray_failures_become_gold_errors():
    rex = pytest.importorskip("ray.exceptions")
    own = GoldInputError("Row 3 of data.jsonl: bad.")
    assert cluster.ray_failure(rex.RayTaskError("f", "tb", own), "align") is own
    lost = cluster.ray_failure(rex.WorkerCrashedError(), "align")
    assert isinstance(lost, WorkerFailedError) and "--resume" in str(lost)
    failed = cluster.ray_failure(rex.RayTaskError("f", "tb", KeyError("x")), "teacher-cache")
    assert isinstance(failed, WorkerFailedError) and "KeyError" in str(failed)
