"""The demo's PNG report (matplotlib, Agg backend: no display needed).

Three panels, each fed by a small pure function over the run's own files:
  loss curves            <- metrics.jsonl of each training phase (`loss_curve`)
  group-size histogram   <- student/teacher group ids of the aligned shards (`group_sizes`)
  top-K tail mass        <- teacher_topk_logprobs of a teacher cache (`topk_tail_mass`)

    from gold_pipeline.recipes.report import write_report
    write_report("runs/demo/report.png", curves={...}, student_group_sizes=..., teacher_group_sizes=...,
                 tail_mass=..., title="...")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gold_pipeline.data.shards import read_manifest, shard_paths
from gold_pipeline.errors import GoldInputError


def _read_columns(out_dir: str | Path, columns: list[str], kind: str) -> pa.Table:
    """The given columns of every shard listed in the manifest of `out_dir`, concatenated."""
    manifest = read_manifest(out_dir, kind=kind)
    tables = [pq.read_table(path, columns=columns) for path in shard_paths(out_dir, manifest)]
    if not tables:
        raise GoldInputError(f"{out_dir}: the manifest lists no shards; rerun the stage that writes it.")
    return pa.concat_tables(tables)


def _flat_list(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """list<T> column -> (values (N,), row lengths (rows,))."""
    array = column.combine_chunks()
    lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), lengths


def sizes_from_group_ids(group_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Tokens per aligned group, all rows together.

    group_ids: (N,) per-row group ids (0,0,1,2,2,...; -1 = excluded) of rows laid end to end;
    lengths: (rows,) tokens per row. Returns (G,) int64 sizes (excluded tokens are not a group).
    """
    row_of = np.repeat(np.arange(len(lengths)), lengths)                               # (N,)
    num_groups = np.zeros(len(lengths), dtype=np.int64)                                # (rows,)
    valid = group_ids >= 0
    np.maximum.at(num_groups, row_of[valid], group_ids[valid].astype(np.int64) + 1)
    offsets = np.concatenate([[0], np.cumsum(num_groups)[:-1]])                        # (rows,)
    global_ids = group_ids[valid].astype(np.int64) + offsets[row_of[valid]]            # (N_valid,)
    return np.bincount(global_ids, minlength=int(num_groups.sum()))                    # (G,)


def group_sizes(aligned_dir: str | Path) -> dict[str, np.ndarray]:
    """{"student": (G,), "teacher": (G,)} tokens per aligned group of an aligned-shard directory."""
    table = _read_columns(aligned_dir, ["student_group_ids", "teacher_group_ids"], kind="aligned")
    out = {}
    for side in ("student", "teacher"):
        ids, lengths = _flat_list(table.column(f"{side}_group_ids"))
        out[side] = sizes_from_group_ids(ids, lengths)
    return out


def tail_mass_from_logprobs(topk_logprobs: np.ndarray) -> np.ndarray:
    """(N, K) top-K log-probs -> (N,) probability mass outside the top K, clipped to [0, 1]."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)                       # (N,)
    return np.clip(1.0 - mass, 0.0, 1.0)


def topk_tail_mass(teacher_cache_dir: str | Path) -> np.ndarray:
    """(N,) teacher tail mass (1 - sum of the K cached probabilities) at every cached completion token."""
    table = _read_columns(teacher_cache_dir, ["teacher_topk_logprobs"], kind="teacher")
    rows = table.column("teacher_topk_logprobs").combine_chunks()                     # list<list<float>>
    per_token = rows.flatten()                                                          # (N,) list<float>
    k = per_token.value_lengths().to_numpy(zero_copy_only=False)
    if len(k) == 0:
        return np.zeros(0)
    if (k != k[0]).any():
        raise GoldInputError(f"{teacher_cache_dir}: rows hold different numbers of top-K entries; the cache is "
                              "inconsistent, rerun `gold teacher-cache --overwrite`.")
    values = per_token.flatten().to_numpy(zero_copy_only=False).reshape(-1, int(k[0]))  # (N, K)
    return tail_mass_from_logprobs(values)


def loss_curve(metrics_jsonl: str | Path, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in a trainer metrics.jsonl (records without the key are skipped)."""
    steps, values = [], []
    path = Path(metrics_jsonl)
    if not path.exists():
        return np.zeros(0), np.zeros(0)
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if key in record and record[key] is not None:
            steps.append(record["step"])
            values.append(float(record[key]))
    return np.asarray(steps), np.asarray(values)


def write_report(
    path: str | Path,
    *,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    student_group_sizes: np.ndarray,
    teacher_group_sizes: np.ndarray,
    tail_mass: np.ndarray,
    title: str = "",
    notes: str = "",
) -> Path:
    """Write the three-panel PNG; `curves` maps a label to (steps, values). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))

    ax = axes[0]
    for label, (steps, values) in curves.items():
        if len(steps):
            ax.plot(steps, values, marker="o", markersize=2.5, linewidth=1.2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves")
    if any(len(s) for s, _ in curves.values()):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    largest = int(max(student_group_sizes.max(initial=1), teacher_group_sizes.max(initial=1)))
    top = min(max(largest, 6), 12)
    bins = np.arange(1, top + 2) - 0.5
    sides = (("student", student_group_sizes), ("teacher", teacher_group_sizes))
    ax.hist([np.minimum(sizes, top) for _, sizes in sides], bins=bins,
            label=[f"{side} tokens/group (mean {sizes.mean():.2f})" if len(sizes) else side for side, sizes in sides])
    ax.set_yscale("log")
    ax.set_xlabel(f"tokens in an aligned group (last bin: >= {top})")
    ax.set_ylabel("groups")
    ax.set_title(f"group sizes ({len(student_group_sizes)} groups)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    ax.hist(tail_mass, bins=np.linspace(0, 1, 41), color="tab:purple")
    ax.set_yscale("log")
    ax.set_xlabel("teacher probability mass outside the cached top-K")
    ax.set_ylabel("teacher tokens")
    mean = float(tail_mass.mean()) if len(tail_mass) else float("nan")
    ax.set_title(f"top-K tail mass (mean {mean:.3f}, {len(tail_mass)} tokens)")
    ax.grid(alpha=0.3)

    if title:
        fig.suptitle(title, fontsize=11)
    if notes:
        fig.text(0.5, 0.005, notes, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 0.95 if title else 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
