"""Shards are atomic, markers make resume exact, the manifest is written last and checked by consumers."""

import json
import os

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_pipeline import errors
from gold_pipeline.data import shards
from gold_pipeline.data.schemas import SCHEMA_VERSION, VOCAB_MAP_SCHEMA


def _vocab_rows(n, start=0):
    return [{"student_id": i, "teacher_id": 10 * i} for i in range(start, start + n)]


def _write_two_shards(out):
    writer = shards.ShardWriter(out, kind="vocab_map")
    writer.write_shard(0, _vocab_rows(3), stats={"rows": 3, "by_status": {"ok": 3}}, source_rows=(0, 3))
    writer.write_shard(1, _vocab_rows(2, 3), stats={"rows": 2, "by_status": {"ok": 1, "mismatch": 1}})
    return writer


def test_sample_id_is_stable_canonical_and_depends_on_generation_index():
    messages = [{"role": "user", "content": "héllo", "name": "ignored"}]
    a = shards.sample_id(messages)
    assert a == shards.sample_id([{"content": "héllo", "role": "user"}])  # key order, extra keys irrelevant
    assert a == shards.sample_id("héllo")  # a plain prompt string is one user message
    assert a != shards.sample_id(messages, generation_index=1)
    assert a != shards.sample_id([{"role": "system", "content": "héllo"}])
    # golden value: sha256 of the canonical JSON, so other tools can recompute it
    assert a == __import__("hashlib").sha256(
        '{"generation_index":0,"messages":[{"content":"héllo","role":"user"}]}'.encode()).hexdigest()


def test_shards_then_manifest_last_and_polars_reads_only_shards(tmp_path):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    writer = _write_two_shards(out)
    with pytest.raises(errors.ManifestError, match="--resume"):
        shards.read_manifest(out)  # shards alone are not a finished output
    shards.write_table_atomic(out / "vocab_map" / "vocab_map.parquet", pa.table({"other": [1]}))
    path = writer.write_manifest(config={"a": 1}, fingerprints={"t": {"sha256": "x"}}, stats={"extra": 1},
                                 expected_shards=2)
    manifest = shards.read_manifest(out, kind="vocab_map")
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["num_rows"] == 5 and manifest["num_shards"] == 2
    assert manifest["stats"] == {"rows": 5, "by_status": {"ok": 4, "mismatch": 1}, "extra": 1}
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet"]
    assert manifest["shards"][0]["source_rows"] == [0, 3]
    for shard in manifest["shards"]:
        file = out / shard["file"]
        assert shard["sha256"] == shards.file_sha256(file) and shard["bytes"] == file.stat().st_size
        assert os.stat(path).st_mtime_ns >= file.stat().st_mtime_ns
    shards.verify_shards(out, manifest, checksums=True)
    # the glob sees exactly the shards (vocab map lives in a sub-folder), with no project code
    frame = pl.scan_parquet(str(out / "*.parquet")).collect()
    assert frame["student_id"].to_list() == [0, 1, 2, 3, 4]
    assert pq.read_schema(out / "part-00000.parquet").metadata[b"gold.kind"] == b"vocab_map"


def test_failed_write_leaves_no_shard_and_no_marker(tmp_path, monkeypatch):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    writer = shards.ShardWriter(out, kind="vocab_map")

    def crash(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(shards.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.write_shard(0, _vocab_rows(2))
    assert not (out / "part-00000.parquet").exists()
    assert not writer.is_done(0)
    assert list(out.glob("*.parquet")) == []
    # --resume clears the temporary leftovers
    shards.prepare_output_dir(out, resume=True, overwrite=False)
    assert [p.name for p in out.iterdir()] == ["_gold"]


def test_is_done_needs_marker_and_intact_file(tmp_path):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    writer = _write_two_shards(out)
    assert writer.is_done(0) and writer.is_done(1) and not writer.is_done(2)
    with open(out / "part-00001.parquet", "ab") as handle:
        handle.write(b"x")
    assert not writer.is_done(1)
    (out / "_gold" / "done" / "part-00000.json").unlink()
    assert not writer.is_done(0)


def test_existing_output_is_refused_unless_resume_or_overwrite(tmp_path):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    _write_two_shards(out)
    with pytest.raises(errors.OutputExistsError, match="--resume .* or --overwrite"):
        shards.prepare_output_dir(out, resume=False, overwrite=False)
    with pytest.raises(errors.GoldInputError, match="exclude each other"):
        shards.prepare_output_dir(out, resume=True, overwrite=True)
    shards.prepare_output_dir(out, resume=True, overwrite=False)
    assert (out / "part-00000.parquet").exists()  # resume keeps finished shards
    shards.prepare_output_dir(out, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["_gold"]
    assert list((out / "_gold" / "done").iterdir()) == []


def test_overwrite_refuses_a_folder_with_foreign_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(errors.OutputExistsError, match="did not write"):
        shards.prepare_output_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.GoldInputError, match="is a file"):
        shards.prepare_output_dir(tmp_path / "file", resume=False, overwrite=False)


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    shards.check_run_identity(out, {"shard_size": 4, "dataset": {"sha256": "a"}}, resume=False)
    shards.check_run_identity(out, {"dataset": {"sha256": "a"}, "shard_size": 4}, resume=True)
    with pytest.raises(errors.OutputExistsError, match="shard_size changed"):
        shards.check_run_identity(out, {"shard_size": 8, "dataset": {"sha256": "a"}}, resume=True)


def test_read_manifest_refuses_other_schema_version_kind_and_garbage(tmp_path):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    _write_two_shards(out).write_manifest(config={}, fingerprints={"teacher_tokenizer": {"sha256": "abc",
                                                                                         "name": "pkg:x"}})
    manifest = shards.read_manifest(out)
    with pytest.raises(errors.ManifestError, match="'aligned' output is needed"):
        shards.read_manifest(out, kind="aligned")
    shards.check_fingerprint(manifest, "teacher_tokenizer", "abc")
    with pytest.raises(errors.ManifestError, match="does not match.*regenerate"):
        shards.check_fingerprint(manifest, "teacher_tokenizer", "def")
    data = json.loads((out / "manifest.json").read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(errors.ManifestError, match="schema version .*--overwrite"):
        shards.read_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(errors.ManifestError, match="not valid JSON"):
        shards.read_manifest(out)
    with pytest.raises(errors.ManifestError, match="not a gold output"):
        shards.read_manifest(tmp_path)
    with pytest.raises(errors.ManifestError, match="does not exist"):
        shards.read_manifest(tmp_path / "missing")


def test_verify_shards_detects_a_changed_file(tmp_path):
    out = shards.prepare_output_dir(tmp_path / "out", resume=False, overwrite=False)
    _write_two_shards(out).write_manifest(config={}, fingerprints={})
    manifest = shards.read_manifest(out)
    table = pq.read_table(out / "part-00000.parquet")
    pq.write_table(table.slice(0, 2), out / "part-00000.parquet")
    with pytest.raises(errors.ManifestError, match="missing or changed"):
        shards.verify_shards(out, manifest)


def test_as_table_rejects_wrong_columns_and_casts_types():
    table = shards.as_table({"student_id": [1], "teacher_id": [2]}, VOCAB_MAP_SCHEMA)
    assert table.schema.field("student_id").type == pa.int32()
    with pytest.raises(ValueError, match="missing"):
        shards.as_table({"student_id": [1]}, VOCAB_MAP_SCHEMA)


def test_merge_stats_sums_nested_counts():
    assert shards.merge_stats({"a": 1, "b": {"x": 2}}, {"a": 2, "b": {"x": 1, "y": 5}, "c": "s"}) == {
        "a": 3, "b": {"x": 3, "y": 5}, "c": "s"}
