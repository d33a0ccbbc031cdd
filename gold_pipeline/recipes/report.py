"""`gold report DIR`: a PNG of panels (matplotlib, Agg backend: no display) and a self-contained HTML page for
any gold output folder.

What the folder holds decides the panels (`collect_figures`):
  training run (`gold train`: metrics.jsonl)  one panel per group of logged metrics that is present: loss, loss
                                              parts, hybrid matched/unmatched parts, loss by policy, excluded-token
                                              share, eval bits per byte, tokens/s, on-policy share, ...
  aligned folder (`gold align`)               group sizes, most frequent multi-token groups, top-K tail mass
  teacher cache (`gold teacher-cache`)        top-K tail mass, finish reasons
The alignment numbers are `gold inspect`'s (gold_pipeline.recipes.inspect); this module adds the top-K tail mass
and draws. Panels are plain data (`Panel`), so the PNG, the HTML table and `--json` show the same numbers.

    from gold_pipeline.recipes.report import write_report
    result = write_report("runs/gold")        # result.png, result.html, result.titles, result.figures

The demo composes its picture from the same pieces: `loss_panel`, `aligned_figures(...).panels`, `draw_panels`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from gold_pipeline.data.shards import MANIFEST_NAME, STATE_DIR, iter_shard_batches, read_manifest
from gold_pipeline.errors import GoldInputError

METRICS_FILE = "metrics.jsonl"             # GOLDConfig.metrics_jsonl's default
TRAIN_CONFIG_FILE = "gold_train_config.json"
EXPECTED = ("a `gold train` output folder (metrics.jsonl, gold_train_config.json) or a `gold align` / "
            "`gold teacher-cache` output folder (manifest.json of kind 'aligned' or 'teacher')")

# (title, y label, metrics.jsonl keys) of the training panels, in drawing order; a panel whose keys are all absent
# is left out. Keys not listed here nor in NOT_PLOTTED get a panel of their own (new metrics still show up).
TRAINING_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("training loss", "loss", ("loss",)),
    ("loss parts", "loss", ("distillation_loss", "crossentropy_loss", "seq_kd_loss")),
    ("hybrid loss: matched / unmatched vocabulary", "part (before weights)",
     ("matched_loss", "unmatched_loss", "uld_fast_error_bound")),
    ("loss by policy", "loss", ("off_policy_loss", "on_policy_loss", "seq_kd_policy_loss")),
    ("excluded-token share", "share of student tokens", ("excluded_token_share",)),
    ("eval bits per byte", "bits per byte", ("eval_bits_per_byte",)),
    ("eval loss", "nats per token", ("eval_loss",)),
    ("throughput", "student tokens / s", ("tokens_per_second",)),
    ("on-policy share", "share", ("on_policy_share", "generation_time_share")),
    ("learning rate", "learning rate", ("learning_rate",)),
    ("gradient norm", "norm", ("grad_norm",)),
    ("generated tokens (on-policy samples)", "tokens per logging step", ("generated_tokens",)),
)
NOT_PLOTTED = frozenset({"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
                         "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second",
                         "eval_steps_per_second"})

PANEL_INCHES = (5.0, 3.6)   # (width, height) of one panel
COLUMNS = 3                  # panels per row
DPI = 100
TITLE_INCHES, NOTES_INCHES = 0.5, 0.3
GROUP_SIZE_CAP = 12          # the last group-size bin holds every larger group
TAIL_BINS = 40


# ----------------------------------------------------------------------------------------------------------
# Figures: plain data.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One plot. series: label -> (x, y); x are steps, bin centres, or category labels (style "barh")."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list, list]]
    style: str = "line"     # "line" | "bar" (numeric x, bars `width` wide) | "barh" (horizontal, x = labels)
    width: float = 1.0
    log_y: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "style": self.style, "xlabel": self.xlabel, "ylabel": self.ylabel,
                "series": {label: {"x": list(x), "y": list(y)} for label, (x, y) in self.series.items()}}


@dataclass
class Figures:
    """Everything a report shows: the summary table (name -> value) and the panels."""

    folder: str
    kind: str                                    # "train" | "aligned" | "teacher"
    table: dict[str, Any]
    panels: list[Panel]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "kind": self.kind, "table": self.table,
                "panels": [panel.to_dict() for panel in self.panels], "notes": self.notes}


def line_panel(title: str, ylabel: str, series: dict[str, tuple[Any, Any]],
               xlabel: str = "optimizer step") -> Panel | None:
    """A line panel of the series that have points; None when none has."""
    kept = {label: (_floats(x), _floats(y)) for label, (x, y) in series.items() if len(x)}
    return Panel(title, xlabel, ylabel, kept) if kept else None


def loss_panel(curves: dict[str, tuple[Any, Any]], title: str = "training loss") -> Panel | None:
    """Loss curves, one per label (e.g. per training phase)."""
    return line_panel(title, "loss", curves)


def _floats(values: Any) -> list[float]:
    return [float(v) for v in values]


# ----------------------------------------------------------------------------------------------------------
# Training runs: metrics.jsonl.
# ----------------------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a trainer metrics.jsonl ([] when missing). A last line still being written (no newline
    yet) is left out; any other line that is not JSON is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the part after the last newline is unfinished
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise GoldInputError(f"{path} line {number} is not JSON ({error.msg}): the file is damaged; rerun the "
                                 "training or remove that line.") from error
    return records


def metric_series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records that hold a number for it."""
    points = [(record.get("step", 0), float(record[key])) for record in records
              if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)]
    steps = np.asarray([p[0] for p in points], dtype=np.int64)
    return steps, np.asarray([p[1] for p in points], dtype=np.float64)


def loss_curve(metrics_jsonl: str | Path, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in a trainer metrics.jsonl (records without the key are skipped)."""
    return metric_series(read_metrics(metrics_jsonl), key)


def _repeats(panel: Panel, earlier: list[Panel]) -> bool:
    """Every series of `panel` is already drawn (e.g. distillation_loss == loss when there is no other part)."""
    drawn = [series for other in earlier for series in other.series.values()]
    return all(any(len(x) == len(dx) and np.allclose(x, dx) and np.allclose(y, dy, rtol=1e-5, atol=1e-8)
                   for dx, dy in drawn) for x, y in panel.series.values())


def training_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """The TRAINING_PANELS whose metrics are present (a panel repeating drawn curves is left out), then one panel
    per other numeric metric."""
    panels: list[Panel] = []
    for title, ylabel, keys in TRAINING_PANELS:
        panel = line_panel(title, ylabel, {key: metric_series(records, key) for key in keys})
        if panel is not None and not _repeats(panel, panels):
            panels.append(panel)
    listed = {key for _, _, keys in TRAINING_PANELS for key in keys} | NOT_PLOTTED
    others = sorted({key for record in records for key, value in record.items()
                     if key not in listed and isinstance(value, (int, float)) and not isinstance(value, bool)})
    for key in others:
        panel = line_panel(key, key, {key: metric_series(records, key)})
        if panel is not None:
            panels.append(panel)
    return panels


def _first_last(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    _, values = metric_series(records, key)
    return {f"{key}_first": round(float(values[0]), 6), f"{key}_last": round(float(values[-1]), 6)} if len(values) \
        else {}


def _mean(records: list[dict[str, Any]], key: str) -> dict[str, float]:
    _, values = metric_series(records, key)
    return {f"{key}_mean": round(float(values.mean()), 6)} if len(values) else {}


def training_table(run_dir: Path, records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a run: what was trained, loss and eval bits per byte first -> last, rates, checkpoints."""
    job, args = config.get("job", {}), config.get("args", {})
    steps, losses = metric_series(records, "loss")
    final = next((record for record in reversed(records) if "train_runtime" in record), {})
    table: dict[str, Any] = {
        "student": job.get("student"), "teacher": job.get("teacher"),
        "data": job.get("aligned") or job.get("dataset"), "lmbda": args.get("lmbda"),
        "max_steps": args.get("max_steps"), "last_step": int(steps[-1]) if len(steps) else None,
    }
    table |= _first_last(records, "loss")
    table["loss_min"] = round(float(losses.min()), 6) if len(losses) else None
    table |= _first_last(records, "eval_bits_per_byte")
    table |= _mean(records, "tokens_per_second") | _mean(records, "on_policy_share")
    table |= {"train_runtime_s": final.get("train_runtime"), "train_loss": final.get("train_loss")}
    checkpoints = sorted((p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()),
                         key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1)
    table["checkpoints"] = ", ".join(checkpoints) if checkpoints else None
    return {key: value for key, value in table.items() if value is not None}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise GoldInputError(f"{path} is not valid JSON ({error.msg}): it is not a finished gold train output.")


def training_figures(run_dir: str | Path) -> Figures:
    """Figures of a `gold train` output folder (its metrics.jsonl and gold_train_config.json)."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / TRAIN_CONFIG_FILE)
    name = config.get("args", {}).get("metrics_jsonl", METRICS_FILE) if config else METRICS_FILE
    if not name:
        raise GoldInputError(f"{run_dir}: this run wrote no metrics (metrics_jsonl was off); train with "
                             f"metrics_jsonl set to draw its report.")
    records = read_metrics(run_dir / name)
    panels = training_panels(records)
    if not panels:
        raise GoldInputError(f"{run_dir / name} holds no metrics yet: wait for the first logging step "
                             "(--logging-steps) and rerun gold report.")
    return Figures(str(run_dir), "train", training_table(run_dir, records, config), panels)


# ----------------------------------------------------------------------------------------------------------
# Aligned folders and teacher caches: gold inspect's numbers plus the top-K tail mass.
# ----------------------------------------------------------------------------------------------------------


def tail_mass_from_logprobs(topk_logprobs: np.ndarray) -> np.ndarray:
    """(N, K) top-K log-probs -> (N,) probability mass outside the top K, clipped to [0, 1]."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)                       # (N,)
    return np.clip(1.0 - mass, 0.0, 1.0)


def topk_tail_mass(out_dir: str | Path) -> np.ndarray:
    """(N,) teacher tail mass (1 - sum of the K cached probabilities) at every completion token that has top-K
    log-probs, in a teacher cache or an aligned folder made from one (rows without top-K are left out)."""
    manifest = read_manifest(out_dir)
    parts = []
    for batch in iter_shard_batches(out_dir, manifest, columns=["teacher_topk_logprobs"], batch_size=4096):
        rows = batch.column("teacher_topk_logprobs").drop_null()                           # list<list<float>>
        per_token = rows.flatten()                                                          # (N,) list<float>
        k = per_token.value_lengths().to_numpy(zero_copy_only=False)
        if len(k) == 0:
            continue
        if (k != k[0]).any() or (parts and parts[0].shape[1] != k[0]):
            raise GoldInputError(f"{out_dir}: rows hold different numbers of top-K entries; the cache is "
                                 "inconsistent, rerun `gold teacher-cache --overwrite`.")
        parts.append(per_token.flatten().to_numpy(zero_copy_only=False).reshape(-1, int(k[0])))  # (N, K)
    return tail_mass_from_logprobs(np.concatenate(parts)) if parts else np.zeros(0)


def group_sizes(aligned_dir: str | Path) -> dict[str, np.ndarray]:
    """{"student": (G,), "teacher": (G,)} tokens per aligned group of an aligned-shard folder."""
    from gold_pipeline.recipes.inspect import SIDES, sizes_per_group

    manifest = read_manifest(aligned_dir, kind="aligned")
    columns = ["num_groups"] + [f"{side}_group_ids" for side in SIDES]
    parts: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    for batch in iter_shard_batches(aligned_dir, manifest, columns=columns, batch_size=4096):
        num_groups = batch.column("num_groups").to_numpy().astype(np.int64)
        for side in SIDES:
            column = batch.column(f"{side}_group_ids")
            lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            ids = column.flatten().to_numpy(zero_copy_only=False)
            parts[side].append(sizes_per_group(ids, lengths, num_groups))
    return {side: np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64) for side, chunks in parts.items()}


def capped_counts(counts: list[int], cap: int) -> list[int]:
    """Group-size counts ([i] = groups of i + 1 tokens) with every group of `cap` or more tokens in the last bin."""
    return list(counts[: cap - 1]) + [int(sum(counts[cap - 1:]))] if len(counts) > cap else list(counts)


def group_size_panel(report: dict[str, Any], cap: int = GROUP_SIZE_CAP) -> Panel | None:
    """Histogram of tokens per group on each side, from a `gold inspect` report of an aligned folder."""
    if not report.get("groups"):
        return None
    sides = ("student", "teacher")
    bins = min(max(len(report[side]["group_size_counts"]) for side in sides), cap)
    series = {}
    for side in sides:
        counts = capped_counts(report[side]["group_size_counts"], cap)
        counts += [0] * (bins - len(counts))
        series[f"{side} (mean {report[side]['tokens_per_group']:.2f} tokens)"] = (list(range(1, bins + 1)), counts)
    last = f" (last bin: >= {cap})" if bins == cap else ""
    return Panel(f"group sizes ({report['groups']} groups)", f"tokens in an aligned group{last}", "groups",
                 series, style="bar", log_y=True)


LABEL_FONT = "monospace"     # the group labels' font family


@lru_cache(maxsize=1)
def _label_codepoints() -> frozenset[int]:
    """Code points the label font can draw."""
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont(font_manager.FontProperties(family=LABEL_FONT))
    return frozenset(ft2font.FT2Font(path).get_charmap())


def plain_label(text: str, drawable: frozenset[int] | None = None) -> str:
    """A string matplotlib draws as written: repr-quoted, `$` escaped (no mathtext), characters outside
    `drawable` (default: what the label font has, e.g. not CJK) as \\u escapes."""
    drawable = _label_codepoints() if drawable is None else drawable
    quoted = repr(text).replace("$", r"\$")
    return "".join(ch if ord(ch) in drawable else f"\\u{ord(ch):04x}" for ch in quoted)


def top_groups_panel(report: dict[str, Any]) -> Panel | None:
    """The most frequent multi-token groups of a `gold inspect` report (text when its tokenizers loaded)."""
    entries = report.get("top_multi_token_groups") or []
    if not entries:
        return None
    labels = []
    for entry in entries:
        sizes = f"{len(entry['student_ids'])}|{len(entry['teacher_ids'])}"
        text = plain_label(entry["text"]) if "text" in entry else f"ids {entry['student_ids']}|{entry['teacher_ids']}"
        labels.append(f"{text}  {sizes}")
    counts = [int(entry["count"]) for entry in entries]
    return Panel(f"most frequent multi-token groups (first {report['top_groups_from_rows']} rows)", "occurrences",
                 "group  student|teacher tokens", {"groups": (labels, counts)}, style="barh")


def tail_mass_histogram(tail: np.ndarray, bins: int = TAIL_BINS) -> tuple[list[float], list[int]]:
    """(bin centres, counts) of tail masses over [0, 1] in `bins` equal bins."""
    counts, edges = np.histogram(np.clip(tail, 0.0, 1.0), bins=np.linspace(0.0, 1.0, bins + 1))
    return ((edges[:-1] + edges[1:]) / 2).tolist(), counts.astype(np.int64).tolist()


def tail_mass_panel(tail: np.ndarray, bins: int = TAIL_BINS) -> Panel | None:
    """Histogram of the teacher probability mass outside the cached top-K; None without top-K data."""
    if not len(tail):
        return None
    centres, counts = tail_mass_histogram(tail, bins)
    return Panel(f"top-K tail mass ({len(tail)} teacher tokens)", "teacher probability mass outside the top-K",
                 "teacher tokens", {f"mean {float(tail.mean()):.3f}": (centres, counts)}, style="bar",
                 width=1.0 / bins, log_y=True)


def finish_reason_panel(report: dict[str, Any]) -> Panel | None:
    """Rows per finish reason of a teacher cache's `gold inspect` report."""
    reasons = report.get("finish_reasons") or {}
    if not reasons:
        return None
    ordered = sorted(reasons.items(), key=lambda item: -item[1])
    return Panel(f"finish reasons ({report['rows']} rows)", "rows", "finish reason",
                 {"rows": ([str(name) for name, _ in ordered], [int(n) for _, n in ordered])}, style="barh")


def _tail_table(tail: np.ndarray) -> dict[str, Any]:
    return {"teacher_tokens_with_topk": int(len(tail)),
            "topk_tail_mass_mean": round(float(tail.mean()), 6)} if len(tail) else {}


def aligned_table(report: dict[str, Any], tail: np.ndarray) -> dict[str, Any]:
    """The summary numbers of an aligned folder (from its `gold inspect` report)."""
    table: dict[str, Any] = {key: report[key] for key in ("rows", "shards", "groups", "rows_by_status",
                                                          "truncated_rows")}
    for side in ("student", "teacher"):
        part = report[side]
        table |= {f"{side}_tokenizer": part.get("tokenizer"), f"{side}_completion_tokens": part.get("completion_tokens"),
                  f"{side}_tokens_per_group": round(part["tokens_per_group"], 4),
                  f"{side}_multi_token_group_share": round(part["multi_token_group_share"], 4),
                  f"{side}_excluded_tokens": part.get("excluded_tokens")}
    table["vocab_map_pairs"] = report["vocab_map"]["pairs"]
    return table | _tail_table(tail)


def teacher_table(report: dict[str, Any], tail: np.ndarray) -> dict[str, Any]:
    """The summary numbers of a teacher cache (from its `gold inspect` report)."""
    table = {key: report[key] for key in ("rows", "shards", "teacher_tokens", "topk_k", "teacher_tokenizer",
                                          "finish_reasons")}
    table["bytes_per_teacher_token"] = round(report["bytes_per_teacher_token"], 2)
    return table | _tail_table(tail)


def aligned_figures(out_dir: str | Path, *, top: int = 10, load_tokenizers: bool = True) -> Figures:
    """Figures of a `gold align` or `gold teacher-cache` output folder (gold inspect's report + tail mass)."""
    from gold_pipeline.recipes.inspect import inspect_output

    report = inspect_output(out_dir, top=top, load_tokenizers=load_tokenizers)
    tail = topk_tail_mass(out_dir)
    if report["kind"] == "teacher":
        panels = [tail_mass_panel(tail), finish_reason_panel(report)]
        table = teacher_table(report, tail)
    else:
        panels = [group_size_panel(report), top_groups_panel(report), tail_mass_panel(tail)]
        table = aligned_table(report, tail)
    return Figures(str(out_dir), report["kind"], table, [p for p in panels if p is not None], list(report["notes"]))


# ----------------------------------------------------------------------------------------------------------
# Which folder is this.
# ----------------------------------------------------------------------------------------------------------


def folder_kind(folder: str | Path) -> str:
    """"train", "aligned" or "teacher"; GoldInputError naming the folder and what was expected otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GoldInputError(f"{folder} is not a folder: gold report needs {EXPECTED}.")
    if (folder / MANIFEST_NAME).exists() or (folder / STATE_DIR).is_dir():
        kind = read_manifest(folder)["kind"]  # an unfinished run: read_manifest says to --resume it
        if kind not in ("aligned", "teacher"):
            raise GoldInputError(f"{folder} holds {kind!r} output; gold report needs {EXPECTED}.")
        return kind
    if (folder / METRICS_FILE).exists() or (folder / TRAIN_CONFIG_FILE).exists():
        return "train"
    raise GoldInputError(f"{folder} is not a gold output folder: gold report needs {EXPECTED}.")


def collect_figures(folder: str | Path, *, top: int = 10, load_tokenizers: bool = True) -> Figures:
    """The figures of any gold output folder (see the module docstring)."""
    if folder_kind(folder) == "train":
        return training_figures(folder)
    return aligned_figures(folder, top=top, load_tokenizers=load_tokenizers)


# ----------------------------------------------------------------------------------------------------------
# Drawing.
# ----------------------------------------------------------------------------------------------------------


def grid_shape(num_panels: int) -> tuple[int, int]:
    """(rows, columns) of the panel grid: as few rows as COLUMNS panels per row allow, then as few columns as
    fill them (4 panels: 2 x 2, not 3 + 1)."""
    rows = max(1, math.ceil(num_panels / COLUMNS))
    return rows, max(1, math.ceil(num_panels / rows))


def figure_inches(num_panels: int, *, title: bool = False, notes: bool = False) -> tuple[float, float]:
    """(width, height) of the whole figure in inches."""
    rows, columns = grid_shape(num_panels)
    height = rows * PANEL_INCHES[1] + (TITLE_INCHES if title else 0.0) + (NOTES_INCHES if notes else 0.0)
    return columns * PANEL_INCHES[0], height


def figure_pixels(num_panels: int, *, title: bool = False, notes: bool = False) -> tuple[int, int]:
    """(height, width) of the PNG in pixels, as `matplotlib.image.imread(...).shape[:2]` gives them."""
    width, height = figure_inches(num_panels, title=title, notes=notes)
    return round(height * DPI), round(width * DPI)


def _draw_panel(ax, panel: Panel) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    if panel.style == "barh":
        (labels, counts), = panel.series.values()
        positions = np.arange(len(labels))[::-1]  # the largest on top
        ax.barh(positions, counts, color="tab:green")
        ax.set_yticks(positions, labels, fontsize=7, family=LABEL_FONT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif panel.style == "bar":
        width = panel.width * 0.8 / len(panel.series)
        for i, (label, (x, y)) in enumerate(panel.series.items()):
            ax.bar(np.asarray(x) + (i - (len(panel.series) - 1) / 2) * width, y, width=width, label=label)
        if panel.width >= 1:  # one bar (group) per integer category
            ax.set_xticks(next(iter(panel.series.values()))[0])
    else:
        from matplotlib.ticker import MaxNLocator

        for label, (x, y) in panel.series.items():
            ax.plot(x, y, marker="o" if len(x) <= 60 else None, markersize=2.5, linewidth=1.2, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
        ax.ticklabel_format(axis="y", useOffset=False)
    if panel.log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    if panel.style != "barh":
        ax.legend(fontsize=7)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def draw_panels(panels: list[Panel], path: str | Path, *, title: str = "", notes: str = "") -> list[str]:
    """Draw `panels` on a grid into the PNG `path` (written under a temporary name, then renamed). Returns the
    panel titles in drawing order; the PNG is figure_pixels(len(panels), title=.., notes=..) large."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("draw_panels needs at least one panel.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, columns = grid_shape(len(panels))
    width, height = figure_inches(len(panels), title=bool(title), notes=bool(notes))
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), dpi=DPI, squeeze=False, layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    if notes:
        fig.supxlabel(notes, fontsize=8)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(path)
    return [panel.title for panel in panels]


# ----------------------------------------------------------------------------------------------------------
# HTML and the whole report.
# ----------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    return html.escape(text)


def _series_rows(panel: Panel) -> list[str]:
    rows = []
    for label, (x, y) in panel.series.items():
        values = np.asarray(y, dtype=np.float64)
        last = f"{values[-1]:.6g}" if panel.style == "line" else f"total {values.sum():.6g}"
        rows.append(f"<tr><td>{_cell(panel.title)}</td><td>{_cell(label)}</td><td>{len(values)}</td>"
                    f"<td>{values.min():.6g}</td><td>{values.max():.6g}</td><td>{last}</td></tr>")
    return rows


def render_html(figures: Figures, png: bytes, *, title: str) -> str:
    """A self-contained page: the PNG inline (base64), the summary table and one row per plotted series."""
    summary = "".join(f"<tr><th>{_cell(k)}</th><td>{_cell(v)}</td></tr>" for k, v in figures.table.items())
    series = "".join(row for panel in figures.panels for row in _series_rows(panel))
    notes = "".join(f"<p class=note>{_cell(note)}</p>" for note in figures.notes)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_cell(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}} img{{max-width:100%}}
.note{{color:#a50}}</style></head>
<body><h1>{_cell(title)}</h1>
<img alt="{_cell(title)}" src="data:image/png;base64,{image}">
{notes}<h2>Summary</h2><table>{summary}</table>
<h2>Series</h2><table><tr><th>panel</th><th>series</th><th>points</th><th>min</th><th>max</th><th>last</th></tr>
{series}</table></body></html>
"""


@dataclass
class ReportResult:
    figures: Figures
    png: Path
    html: Path | None
    titles: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"png": str(self.png), "html": str(self.html) if self.html else None, **self.figures.to_dict()}


def report_title(figures: Figures) -> str:
    what = {"train": "training run", "aligned": "aligned folder", "teacher": "teacher cache"}[figures.kind]
    return f"gold report: {what} {figures.folder}"


def write_report(folder: str | Path, *, png: str | Path | None = None, html_page: bool = True,
                 top: int = 10, load_tokenizers: bool = True) -> ReportResult:
    """Draw the report of `folder` into `png` (default FOLDER/report.png) and, with `html_page`, a self-contained
    HTML page next to it (same name, .html)."""
    figures = collect_figures(folder, top=top, load_tokenizers=load_tokenizers)
    if not figures.panels:
        raise GoldInputError(f"{folder}: nothing to draw (no groups, no top-K log-probs and no finish reasons).")
    png_path = Path(png) if png is not None else Path(folder) / "report.png"
    title = report_title(figures)
    titles = draw_panels(figures.panels, png_path, title=title)
    html_path = None
    if html_page:
        html_path = png_path.with_suffix(".html")
        html_path.write_text(render_html(figures, png_path.read_bytes(), title=title), encoding="utf-8")
    return ReportResult(figures, png_path, html_path, titles)


def format_result(result: ReportResult) -> str:
    """The lines `gold report` prints: the summary table and where the files went."""
    lines = [report_title(result.figures)]
    lines += [f"  {key}: {value}" for key, value in result.figures.table.items()]
    lines += [f"note: {note}" for note in result.figures.notes]
    lines.append(f"png   {result.png} ({len(result.titles)} panels: {', '.join(result.titles)})")
    if result.html is not None:
        lines.append(f"html  {result.html}")
    return "\n".join(lines)
