"""Vocab map: student id <-> teacher id with identical token bytes."""

from __future__ import annotations

import numpy as np
import pytest

from gold_pipeline.text.vocab_map import build_vocab_map, build_vocab_map_exact
from tests.helpers import table, tok


def test_byte_level_and_sentencepiece_spaces_match():
    smol, mistral = tok("pkg:smollm2"), tok("pkg:mistral-sp-v1")
    vocab_map = build_vocab_map(table("pkg:smollm2"), table("pkg:mistral-sp-v1"))
    pairs = {int(s): int(t) for s, t in vocab_map}
    assert pairs[smol.convert_tokens_to_ids("Ġthe")] == mistral.convert_tokens_to_ids("▁the")
    assert pairs[smol.convert_tokens_to_ids("Ċ")] == mistral.convert_tokens_to_ids("<0x0A>")


def test_map_is_sorted_unique_and_byte_identical():
    s_table, t_table = table("pkg:mistral-sp-v1"), table("pkg:deepseek-v3")
    vocab_map = build_vocab_map(s_table, t_table)
    assert vocab_map.dtype == np.int64 and vocab_map.ndim == 2 and vocab_map.shape[1] == 2
    assert np.all(np.diff(vocab_map[:, 0]) > 0)  # sorted by student id, each student id once
    assert len(np.unique(vocab_map[:, 1])) == len(vocab_map)
    for s, t in vocab_map[:: max(1, len(vocab_map) // 2000)]:
        assert s_table.token_bytes[s] == t_table.token_bytes[t] != b""
    assert not s_table.is_special[vocab_map[:, 0]].any() and not t_table.is_special[vocab_map[:, 1]].any()
    assert 10_000 < len(vocab_map) < 32_000


def test_same_tokenizer_maps_every_real_token_to_itself():
    t = table("pkg:qwen")
    vocab_map = build_vocab_map(t, t)
    real = np.flatnonzero((t.lengths > 0) & ~t.is_special)
    assert np.array_equal(vocab_map[:, 0], real) and np.array_equal(vocab_map[:, 1], real)


def test_specials_never_match():
    qwen, smol = table("pkg:qwen"), table("pkg:smollm2")
    vocab_map = build_vocab_map(smol, qwen)
    im_end_smol = tok("pkg:smollm2").convert_tokens_to_ids("<|im_end|>")
    assert im_end_smol not in set(vocab_map[:, 0].tolist())


def test_byte_fallback_duplicates_map_the_regular_piece():
    # mistral has both "<0x41>" and "A" spelling b"A": only the regular piece is in the (one-to-one) map
    mistral, smol = tok("pkg:mistral-sp-v1"), tok("pkg:smollm2")
    vocab_map = build_vocab_map(table("pkg:mistral-sp-v1"), table("pkg:smollm2"))
    pairs = {int(s): int(t) for s, t in vocab_map}
    assert pairs[mistral.convert_tokens_to_ids("A")] == smol.convert_tokens_to_ids("A")
    assert mistral.convert_tokens_to_ids("<0x41>") not in pairs
    assert pairs[mistral.convert_tokens_to_ids("<0x0A>")] == smol.convert_tokens_to_ids("Ċ")  # no regular "\n"


@pytest.mark.parametrize("student,teacher", [("pkg:cl100k", "pkg:deepseek-v3"), ("pkg:mistral-sp-v1", "pkg:qwen"),
                                             ("pkg:gemma3", "pkg:smollm2"), ("pkg:mistral-sp-v1", "pkg:mistral-sp-v1")])
def test_vectorized_map_equals_the_exact_dict_join(student, teacher):
    s_table, t_table = table(student), table(teacher)
    assert np.array_equal(build_vocab_map(s_table, t_table), build_vocab_map_exact(s_table, t_table))


@pytest.mark.parametrize("fake_hash", ["constant", "id"])
def test_hash_collisions_fall_back_to_the_exact_join(monkeypatch, fake_hash):
    # "constant": every token of a side collides with every other; "id": hashes unique per side, but student id i
    # and teacher id i collide across sides although their bytes differ
    from gold_pipeline import vocab_map as module

    def hashes(table_, ids):
        return np.zeros(ids.size, dtype=np.uint64) if fake_hash == "constant" else ids.astype(np.uint64)

    monkeypatch.setattr(module, "_token_hashes", hashes)
    s_table, t_table = table("pkg:mistral-sp-v1"), table("pkg:smollm2")
    assert np.array_equal(build_vocab_map(s_table, t_table), build_vocab_map_exact(s_table, t_table))


def test_cached_map_is_kept_on_disk_and_a_bad_file_is_rebuilt(monkeypatch, tmp_path):
    from gold_pipeline.text.vocab_map import cached_vocab_map

    monkeypatch.setenv("GOLD_CACHE_DIR", str(tmp_path))
    s_table, t_table = table("pkg:mistral-sp-v1"), table("pkg:smollm2")
    expected = build_vocab_map(s_table, t_table)
    assert np.array_equal(cached_vocab_map(s_table, t_table), expected)
    (path,) = (tmp_path / "vocab_maps").glob("*.npy")
    assert np.array_equal(np.load(path), expected)
    assert np.array_equal(cached_vocab_map(s_table, t_table), expected)  # loaded
    assert len(list((tmp_path / "vocab_maps").iterdir())) == 1
    # the key is the pair of contents, in order: the swapped pair gets its own file
    assert np.array_equal(cached_vocab_map(t_table, s_table), build_vocab_map(t_table, s_table))
    assert len(list((tmp_path / "vocab_maps").glob("*.npy"))) == 2
    for bad in (b"not a numpy file", None):
        if bad is None:  # well-formed npy, wrong content (a student id out of range)
            np.save(path, np.array([[10**9, 0]], dtype=np.int64))
        else:
            path.write_bytes(bad)
        assert np.array_equal(cached_vocab_map(s_table, t_table), expected)
        assert np.array_equal(np.load(path), expected)  # rewritten


def test_extra_pairs_join_only_where_both_ids_are_free():
    from gold_pipeline.text.vocab_map import with_extra_pairs

    pairs = np.array([[1, 10], [4, 12]], dtype=np.int64)
    extra = np.array([[3, 20], [4, 21], [5, 10], [0, 22]], dtype=np.int64)  # 4 and 10 are taken already
    merged = with_extra_pairs(pairs, extra)
    assert merged.tolist() == [[0, 22], [1, 10], [3, 20], [4, 12]]
    assert merged.dtype == np.int64
    assert with_extra_pairs(pairs, np.zeros((0, 2), dtype=np.int64)).tolist() == pairs.tolist()
