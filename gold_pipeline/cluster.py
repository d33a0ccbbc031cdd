"""`--executor ray`: run a stage's shards on a Ray cluster with the same shards, manifest and resume contract as the
local executor (docs/scaling.md).

The stage keeps the contract; this module only connects and moves work:
- `ray_session` starts a private local cluster (loopback node address, no dashboard, `num_cpus` = workers) or joins
  the one at `--ray-address`, after checking within `CONNECT_TIMEOUT_S` that it answers: an unreachable address is a
  `ClusterUnreachableError` naming it, never a hang or a traceback;
- `RayShardQueue` keeps at most `limit` shard tasks in flight and hands back the finished ones;
- `ray_failure` turns what Ray raises into gold's errors: a GoldError raised by a worker is re-raised as it is, a
  lost worker or a failed task is a `WorkerFailedError` that says to rerun with --resume.
Tasks are not retried by Ray (`max_retries=0`): a lost worker stops the run like a dead local worker, the shards
already written stay (each is written atomically by its worker, with its completion marker), and --resume redoes
only the missing ones.
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from gold_pipeline.errors import ClusterUnreachableError, GoldError, GoldInputError, WorkerFailedError

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_S = 15.0  # TCP check of --ray-address, then again for ray.init to return
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a private local cluster: shards pass through it one at a time
RAY_HINT = "install the ray extra (pip install 'gold-pipeline[ray]')"


def check_executor(executor: str, ray_address: str | None) -> None:
    """Validate --executor / --ray-address (GoldInputError sentences)."""
    if executor not in EXECUTORS:
        raise GoldInputError(f"--executor must be one of {EXECUTORS}, got {executor!r}.")
    if ray_address is not None and executor != "ray":
        raise GoldInputError("--ray-address needs --executor ray.")
    if ray_address is not None and ray_address != "auto":
        host, port = _host_port(ray_address)
        if not host or port is None:
            raise GoldInputError(f"--ray-address {ray_address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, "
                                 f"ray://10.0.0.5:10001) or 'auto'.")


def _host_port(address: str) -> tuple[str, int | None]:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return rest, None


def _check_reachable(address: str, timeout_s: float) -> None:
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as error:
        reason = f"no answer within {timeout_s:.0f} s" if isinstance(error, TimeoutError) else error.strerror or error
        raise ClusterUnreachableError(
            f"Cannot reach the Ray cluster at {address} ({reason}). Check "
            f"that its head node runs (`ray start --head --port {port}`) and that this machine can reach it, or drop "
            f"--ray-address to run on a local Ray cluster."
        ) from None


def _init_within(ray, timeout_s: float, where: str, **options: Any) -> None:
    """ray.init in a helper thread, given up after `timeout_s` (ray.init itself can wait a long time)."""
    outcome: dict[str, BaseException | None] = {}

    def target() -> None:
        try:
            ray.init(**options)
            outcome["error"] = None
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=target, name="ray-init", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise ClusterUnreachableError(f"The Ray cluster at {where} did not accept this driver within {timeout_s:.0f}"
                                      f" s: check that it is a Ray head node (its GCS port), that it runs Ray "
                                      f"{ray.__version__}, and, if it uses token authentication, that RAY_AUTH_MODE="
                                      f"token and the cluster's token are set for this driver.")
    if outcome["error"] is not None:
        error = outcome["error"]
        raise ClusterUnreachableError(f"Could not join the Ray cluster at {where}: {type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''}") from None


@contextmanager
def ray_session(address: str | None, num_cpus: int, *, timeout_s: float = CONNECT_TIMEOUT_S) -> Iterator[Any]:
    """The `ray` module, connected: a private local cluster (address None) or the cluster at `address`."""
    try:
        import ray
    except ImportError:
        raise GoldInputError(f"--executor ray needs Ray: {RAY_HINT}.") from None
    options: dict[str, Any] = dict(include_dashboard=False, configure_logging=False, log_to_driver=False)
    if address is None:  # a private cluster, started in the main thread (Ray installs signal handlers)
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 **options)
    else:
        if address != "auto":
            _check_reachable(address, timeout_s)
        _init_within(ray, timeout_s, address, address=address, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_failure(error: BaseException, stage: str) -> GoldError:
    """gold's error for what a Ray call raised in `stage` ("align", "teacher-cache")."""
    import ray.exceptions as rex

    if isinstance(error, rex.RayTaskError):
        cause = error.cause
        if isinstance(cause, GoldError):
            return cause
        return WorkerFailedError(f"A {stage} Ray task failed: {type(cause).__name__}: {cause}. The finished shards "
                                 f"are kept: fix the cause and rerun with --resume.")
    if isinstance(error, (rex.WorkerCrashedError, rex.ActorDiedError, rex.NodeDiedError, rex.ObjectLostError,
                          rex.TaskCancelledError, rex.ActorUnavailableError)):
        return WorkerFailedError(f"A {stage} Ray worker was lost ({type(error).__name__}); the finished shards are "
                                 f"kept: rerun the same command with --resume.")
    if isinstance(error, rex.RayError):
        return WorkerFailedError(f"Ray failed during {stage}: {type(error).__name__}: {error}. The finished shards "
                                 f"are kept: rerun with --resume.")
    raise error


class RayShardQueue:
    """Shard tasks in flight (at most `limit`, so a huge source is never all in the object store): `add` and
    `drain` return the (size, result) of the tasks that finished meanwhile, in completion order."""

    def __init__(self, ray, limit: int, stage: str):
        self.ray, self.limit, self.stage = ray, max(1, limit), stage
        self.pending: dict[Any, int] = {}

    def _collect(self, wait_for: int) -> list[tuple[int, Any]]:
        done, _ = self.ray.wait(list(self.pending), num_returns=wait_for)
        out = []
        for ref in done:
            size = self.pending.pop(ref)
            try:
                out.append((size, self.ray.get(ref)))
            except Exception as error:
                raise ray_failure(error, self.stage) from None
        return out

    def add(self, ref, size: int) -> list[tuple[int, Any]]:
        self.pending[ref] = size
        return self._collect(1) if len(self.pending) >= self.limit else []

    def drain(self) -> list[tuple[int, Any]]:
        return self._collect(len(self.pending)) if self.pending else []

    def cancel(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
