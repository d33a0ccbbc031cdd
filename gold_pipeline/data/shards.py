"""Atomic Parquet shards, completion markers, and the manifest written last (DESIGN.md §5).

Layout of an output directory (the same for `gold align` and `gold teacher-cache`):

    DIR/part-00000.parquet ...     shards; rows [k*S, (k+1)*S) of the source go to shard k
    DIR/manifest.json              written LAST: its presence means the run finished
    DIR/vocab_map/vocab_map.parquet  (aligned output only; in a sub-folder so DIR/*.parquet stays one schema)
    DIR/_gold/run.json             identity of the run (config + fingerprints) checked by --resume
    DIR/_gold/done/part-00000.json completion marker of shard 0 (rows, bytes, sha256, stats)

A shard is written to a hidden temporary name and renamed into place, then its marker is written (also via
a rename). A run killed at any point leaves only whole shards, and `--resume` redoes exactly the shards without
a marker, so the rows equal those of an uninterrupted run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from gold_pipeline.data.schemas import SCHEMA_VERSION, describe_schema, schema_for
from gold_pipeline.errors import GoldInputError, ManifestError, OutputExistsError

MANIFEST_NAME = "manifest.json"
STATE_DIR = "_gold"
FORMAT_NAME = "gold"


def package_version() -> str:
    """gold's version for manifests (from gold_pipeline/__init__.py, else the installed distribution)."""
    try:
        from gold_pipeline import __version__

        return __version__
    except ImportError:  # a stale editable install can map the package as a namespace without __init__
        from importlib.metadata import version

        return version("gold-pipeline")


# --------------------------------------------------------------------------------------------------------------
# Stable ids and fingerprints
# --------------------------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, UTF-8 kept: the same value always gives the same string."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalize_prompt(messages_or_prompt: str | list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """A plain prompt string becomes one user message; messages keep only role and content."""
    if isinstance(messages_or_prompt, str):
        return [{"role": "user", "content": messages_or_prompt}]
    return [{"role": message["role"], "content": message["content"]} for message in messages_or_prompt]


def sample_id(messages_or_prompt: str | list[Mapping[str, Any]], generation_index: int = 0) -> str:
    """sha256 hex of the canonical JSON of the prompt messages and the generation index.

    Stable across runs, processes and machines, so reruns and resumes are idempotent and rows of the
    teacher cache and the aligned output join on it.
    """
    payload = {"messages": normalize_prompt(messages_or_prompt), "generation_index": int(generation_index)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


HASH_LIMIT_BYTES = 256 << 20


def fingerprint_path(path: str | os.PathLike, *, hash_limit_bytes: int = HASH_LIMIT_BYTES) -> dict[str, Any]:
    """Fingerprint of a local file (or every file under a folder): path, size, mtime, and sha256 when small.

    Files above `hash_limit_bytes` are identified by size and mtime only, to keep startup fast on big data.
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    entries = []
    for file in files:
        stat = file.stat()
        entry: dict[str, Any] = {"path": str(file), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if stat.st_size <= hash_limit_bytes:
            entry["sha256"] = file_sha256(file)
        entries.append(entry)
    return {"path": str(path), "files": entries}


# --------------------------------------------------------------------------------------------------------------
# Output directories
# --------------------------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _is_gold_entry(name: str) -> bool:
    return (
        name in (MANIFEST_NAME, STATE_DIR, "vocab_map")
        or (name.startswith("part-") and name.endswith(".parquet"))
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def prepare_output_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Create `out_dir`, or refuse an existing non-empty one unless `resume` or `overwrite`.

    resume: keep finished shards (their markers), drop temporaries and the old manifest (it is rewritten
    last). overwrite: delete a previous gold output (only gold's own files; a folder holding anything else
    is refused so that a typo in --out cannot delete unrelated data).
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise GoldInputError("--resume and --overwrite exclude each other: pick one.")
    if out.exists() and not out.is_dir():
        raise GoldInputError(f"Output path {out} is a file, not a folder: choose another --out.")
    entries = sorted(os.listdir(out)) if out.exists() else []
    if entries:
        foreign = [name for name in entries if not _is_gold_entry(name)]
        if not resume and not overwrite:
            raise OutputExistsError(
                f"Output folder {out} already exists and is not empty: pass --resume to finish an interrupted "
                f"run (finished shards are kept) or --overwrite to replace it, or choose another --out."
            )
        if foreign:
            raise OutputExistsError(
                f"Output folder {out} holds files gold did not write ({', '.join(foreign[:5])}): refusing to "
                f"{'resume into' if resume else 'overwrite'} it; choose an empty or new --out."
            )
        if overwrite:
            for name in entries:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        else:
            if not (out / STATE_DIR).is_dir():
                raise OutputExistsError(
                    f"Output folder {out} has no {STATE_DIR}/ run state, so it cannot be resumed: use --overwrite."
                )
            for name in entries:
                if name.startswith(".") and name.endswith(".tmp"):
                    (out / name).unlink()
            (out / MANIFEST_NAME).unlink(missing_ok=True)
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    return out


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [changed for key in sorted(set(old) | set(new))
                for changed in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_run_identity(out_dir: str | os.PathLike, identity: Mapping[str, Any], *, resume: bool) -> None:
    """Record what this run computes (config that changes rows + input fingerprints) in _gold/run.json.

    On --resume, refuse when the recorded identity differs: shards of two different runs must never mix.
    """
    path = Path(out_dir) / STATE_DIR / "run.json"
    identity = json.loads(canonical_json(identity))
    if resume and path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != identity:
            changed = _changed_keys(previous, identity)
            raise OutputExistsError(
                f"Cannot resume {out_dir}: it was started with different settings or inputs "
                f"({', '.join(changed[:6])} changed). Resume with the same options and inputs, or use --overwrite."
            )
        return
    _write_json_atomic(path, identity)


# --------------------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------------------


def as_table(rows: pa.Table | Mapping[str, Any] | list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table with exactly `schema` from a table, a dict of columns, or a list of row dicts."""
    if isinstance(rows, pa.Table):
        table = rows
    elif isinstance(rows, Mapping):
        missing = [name for name in schema.names if name not in rows]
        if missing:
            raise ValueError(f"Shard columns missing: {missing}.")
        table = pa.Table.from_arrays([pa.array(rows[name], type=schema.field(name).type)
                                      if not isinstance(rows[name], (pa.Array, pa.ChunkedArray)) else rows[name]
                                      for name in schema.names], schema=schema)
    else:
        table = pa.Table.from_pylist(list(rows), schema=schema)
    if table.schema.names != schema.names:
        raise ValueError(f"Shard columns {table.schema.names} differ from the schema's {schema.names}.")
    if not table.schema.equals(schema, check_metadata=False):
        table = table.cast(schema)
    return table.replace_schema_metadata(schema.metadata)


class ShardWriter:
    """Writes numbered shards atomically and keeps one completion marker per finished shard.

    out_dir must have been prepared with `prepare_output_dir`. Safe to use from several processes at once
    as long as each shard index is written by one process.
    """

    def __init__(self, out_dir: str | os.PathLike, *, kind: str, compression: str = "zstd"):
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.schema = schema_for(kind)
        self.compression = compression
        self.done_dir = self.out_dir / STATE_DIR / "done"
        self.done_dir.mkdir(parents=True, exist_ok=True)

    def marker_path(self, index: int) -> Path:
        return self.done_dir / shard_name(index).replace(".parquet", ".json")

    def is_done(self, index: int) -> bool:
        """True when shard `index` has a marker and its file exists with the recorded size."""
        marker = self.marker_path(index)
        if not marker.exists():
            return False
        record = json.loads(marker.read_text(encoding="utf-8"))
        shard = self.out_dir / record["file"]
        return shard.exists() and shard.stat().st_size == record["bytes"]

    def write_shard(
        self,
        index: int,
        rows: pa.Table | Mapping[str, Any] | list[dict[str, Any]],
        *,
        stats: Mapping[str, Any] | None = None,
        source_rows: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Write shard `index` (tmp file + fsync + rename), then its marker. Returns the shard record.

        source_rows: the half-open range of source rows this shard covers, recorded for provenance.
        """
        table = as_table(rows, self.schema)
        name = shard_name(index)
        final = self.out_dir / name
        tmp = self.out_dir / f".{name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, compression=self.compression)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        record = {
            "index": index,
            "file": name,
            "rows": table.num_rows,
            "bytes": final.stat().st_size,
            "sha256": file_sha256(final),
            "source_rows": list(source_rows) if source_rows is not None else None,
            "stats": dict(stats or {}),
        }
        _write_json_atomic(self.marker_path(index), record)
        return record

    def records(self) -> list[dict[str, Any]]:
        """Markers of all finished shards, sorted by index."""
        records = [json.loads(p.read_text(encoding="utf-8")) for p in self.done_dir.glob("part-*.json")]
        return sorted(records, key=lambda record: record["index"])

    def write_manifest(
        self,
        *,
        config: Mapping[str, Any],
        fingerprints: Mapping[str, Any],
        stats: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        expected_shards: int | None = None,
    ) -> Path:
        """Write manifest.json from the markers (call after every shard finished). Stats = sum of shard stats
        plus `stats`. expected_shards: refuse to write when markers are missing (a bug, never a user error)."""
        records = self.records()
        if expected_shards is not None and [r["index"] for r in records] != list(range(expected_shards)):
            raise RuntimeError(
                f"{self.out_dir}: expected shards 0..{expected_shards - 1} to be finished, found markers for "
                f"{[r['index'] for r in records]}; not writing the manifest."
            )
        total = merge_stats(*(record["stats"] for record in records), dict(stats or {}))
        return write_manifest(
            self.out_dir,
            kind=self.kind,
            config=config,
            fingerprints=fingerprints,
            shards=records,
            stats=total,
            files=files,
        )


def write_table_atomic(path: str | os.PathLike, table: pa.Table, *, compression: str = "zstd") -> dict[str, Any]:
    """Write one standalone Parquet file atomically (e.g. the vocab map); returns {file, rows, bytes, sha256}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression=compression)
    os.replace(tmp, path)
    return {"rows": table.num_rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def merge_stats(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """Sum nested dicts of counts key by key (dicts merge recursively, numbers add, other values: last wins)."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping):
                out[key] = merge_stats(out.get(key, {}), value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and key in out:
                out[key] = out[key] + value
            else:
                out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------------------


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    kind: str,
    config: Mapping[str, Any],
    fingerprints: Mapping[str, Any],
    shards: list[dict[str, Any]],
    stats: Mapping[str, Any],
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write DIR/manifest.json atomically. Call it LAST: readers take its presence as "the run finished"."""
    manifest = {
        "format": FORMAT_NAME,
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "package_version": package_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "num_rows": sum(int(shard["rows"]) for shard in shards),
        "num_shards": len(shards),
        "config": json.loads(canonical_json(config)),
        "fingerprints": json.loads(canonical_json(fingerprints)),
        "files": dict(files or {}),
        "stats": json.loads(json.dumps(stats)),
        "shards": shards,
        "schema": describe_schema(schema_for(kind)),
    }
    path = Path(out_dir) / MANIFEST_NAME
    _write_json_atomic(path, manifest)
    return path


def read_manifest(out_dir: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Read DIR/manifest.json; refuse a missing/unfinished output, another schema version, or another kind."""
    out = Path(out_dir)
    path = out / MANIFEST_NAME
    if not out.is_dir():
        raise ManifestError(f"{out} does not exist or is not a folder: pass the --out folder of a finished gold run.")
    if not path.exists():
        if (out / STATE_DIR).is_dir():
            raise ManifestError(
                f"{out} has no {MANIFEST_NAME}: the run that writes it did not finish. Rerun that command with "
                f"--resume to finish it."
            )
        raise ManifestError(f"{out} has no {MANIFEST_NAME}: it is not a gold output folder.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}): rerun the command that wrote it with --overwrite.")
    if manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a gold manifest (format {manifest.get('format')!r}).")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{out} was written with schema version {manifest.get('schema_version')} (gold "
            f"{manifest.get('package_version')}), this gold {package_version()} reads version {SCHEMA_VERSION}: rerun "
            f"the command that wrote it with this version and --overwrite."
        )
    if kind is not None and manifest.get("kind") != kind:
        raise ManifestError(
            f"{out} holds {manifest.get('kind')!r} output, but {kind!r} output is needed here: pass the --out "
            f"folder of the right command."
        )
    return manifest


def check_fingerprint(
    manifest: Mapping[str, Any], role: str, fingerprint: str, *, name: str | None = None
) -> None:
    """Refuse when the manifest's tokenizer fingerprint for `role` (e.g. "teacher_tokenizer") differs."""
    recorded = (manifest.get("fingerprints") or {}).get(role) or {}
    if recorded.get("sha256") != fingerprint:
        raise ManifestError(
            f"The {role.replace('_', ' ')} {name or ''} does not match the one recorded in the manifest "
            f"({recorded.get('name')!r}, sha256 {str(recorded.get('sha256'))[:12]}…, this one "
            f"{fingerprint[:12]}…): use the same tokenizer, or regenerate that output with this one."
        )


def shard_paths(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> list[Path]:
    """Paths of the manifest's shards in order."""
    return [Path(out_dir) / shard["file"] for shard in sorted(manifest["shards"], key=lambda s: s["index"])]


def verify_shards(out_dir: str | os.PathLike, manifest: Mapping[str, Any], *, checksums: bool = False) -> None:
    """Refuse missing or changed shard files (size always; sha256 too when `checksums`)."""
    for shard, path in zip(sorted(manifest["shards"], key=lambda s: s["index"]), shard_paths(out_dir, manifest)):
        if not path.exists() or path.stat().st_size != shard["bytes"]:
            raise ManifestError(f"Shard {path} is missing or changed since the manifest was written: rerun with "
                                f"--overwrite.")
        if checksums and file_sha256(path) != shard["sha256"]:
            raise ManifestError(f"Shard {path} does not match its sha256 in the manifest: rerun with --overwrite.")


def iter_shard_batches(
    out_dir: str | os.PathLike, manifest: Mapping[str, Any], *, columns: Iterable[str] | None = None,
    batch_size: int = 1024,
) -> Iterable[pa.RecordBatch]:
    """Record batches of every shard, in shard order."""
    for path in shard_paths(out_dir, manifest):
        parquet = pq.ParquetFile(path)
        yield from parquet.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)
