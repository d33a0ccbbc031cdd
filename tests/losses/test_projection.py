"""Projection loss (issue 14): golden values on tiny vocabularies, chain rule on multi-digit tokens, gradcheck,
chunked == unchunked, gradient accumulation == one big batch, identical tokenizers == plain JSD, top-k forms."""

import functools
import math

import pytest
import torch

from gold_pipeline.losses import generalized_jsd_loss, merged_logprobs, vocab_split
from gold_pipeline.losses.logits import MergeSide, chunked_merged_loss
from gold_pipeline.losses.projection import (
    ProjectionTeacherSide,
    live_pairs,
    projection_chunk_loss,
    projection_columns,
    projection_loss,
    teacher_path_from_logits,
    teacher_path_from_topk,
)
from gold_pipeline.losses.topk import merged_topk

# tiny pair: student 0:"1" 1:"2" 2:"12" 3:"x" 4:"21";  teacher 0:"1" 1:"2" 2:"x" 3:"y"
STUDENT_V, TEACHER_V = 5, 4
VOCAB_MAP = [[0, 0], [1, 1], [3, 2]]
PIECES = {2: [0, 1], 4: [1, 0]}


def _jsd(s: float, t: float, beta: float) -> float:
    m = beta * t + (1 - beta) * s
    return beta * t * math.log(t / m) + (1 - beta) * s * math.log(s / m)


def _tiny():
    """One group "12": student token 2 ("12"), teacher tokens 0, 1 ("1", "2")."""
    p_s = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]], dtype=torch.float64)
    p_t = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    return p_s, p_t


def _online(p_s, p_t, s_ids, t_ids, s_groups, t_groups, groups, depth=2):
    s_lp, t_lp = p_s.log(), p_t.log()
    s_m = merged_logprobs(s_lp, s_ids, s_groups, groups)
    t_m = merged_logprobs(t_lp, t_ids, t_groups, groups)
    path = teacher_path_from_logits(t_lp, t_ids, t_groups, groups, depth)
    return s_m, t_m, path


def _tiny_case():
    """The tiny pair with one student group [2] against teacher group [0, 1]: (split, columns, s_m, t_m, path)."""
    p_s, p_t = _tiny()
    split = vocab_split(VOCAB_MAP, STUDENT_V, TEACHER_V)
    columns = projection_columns(PIECES, STUDENT_V, TEACHER_V)
    s_m, t_m, path = _online(p_s, p_t, torch.tensor([2]), torch.tensor([0, 1]), torch.tensor([0]),
                             torch.tensor([0, 0]), 1)
    return split, columns, s_m, t_m, path


@pytest.mark.parametrize("exclusive", [False, True])
def test_golden_values_on_a_tiny_pair(exclusive):
    split, columns, s_m, t_m, path = _tiny_case()
    beta = 0.5
    loss, diag = projection_loss(s_m, t_m, path, split, columns, beta=beta, matched_weight=1.0, unmatched_weight=1.0,
                                 projected_weight=1.0, log_floor=None, exclusive=exclusive)
    cont = 0.6  # teacher merged = P(first) * P("2" | "1")
    # exclusive: the matched "1" keeps P(1) (1 - P(2 | 1)); its live extension "12" has the rest ("12" itself has
    # no live extension, so it keeps its chain-rule value)
    keep = 1 - 0.6 if exclusive else 1.0
    matched = _jsd(0.1, 0.5 * cont * keep, beta) + _jsd(0.2, 0.2 * cont, beta) + _jsd(0.2, 0.2 * cont, beta)
    projected = _jsd(0.4, 0.5 * 0.6, beta)  # "12": P(1) P(2|1)
    # ULD: student {"12" (live: removed), "21" (first piece "2" is off the path: dead)} vs teacher {"y"}
    unmatched = abs(0.1 - 0.1 * cont)
    assert diag["projected"] == pytest.approx(projected, rel=1e-12)
    assert diag["matched"] == pytest.approx(matched, rel=1e-12)
    assert diag["unmatched"] == pytest.approx(unmatched, rel=1e-12)
    assert float(loss) == pytest.approx(matched + unmatched + projected, rel=1e-12)
    assert diag["projected_pairs"] == 1.0
    assert diag["teacher_mass_matched"] == pytest.approx(0.9)  # "1" + "2" + "x" at the first teacher position
    assert diag["teacher_mass_unmatched"] == pytest.approx(0.1)
    assert diag["teacher_mass_projected"] == pytest.approx(0.3)
    assert diag["teacher_mass_moved"] == pytest.approx(0.3 if exclusive else 0.0)


def test_moved_mass_is_zero_when_the_first_path_token_is_unmatched():
    """Regression: teacher_mass_moved counted P(a_0) * share even when a_0 has no matched column to lower."""
    p_s, p_t = _tiny()
    split = vocab_split([[1, 1], [3, 2]], STUDENT_V, TEACHER_V)  # "1" is not a shared token here
    columns = projection_columns(PIECES, STUDENT_V, TEACHER_V)
    s_m, t_m, path = _online(p_s, p_t, torch.tensor([2]), torch.tensor([0, 1]), torch.tensor([0]),
                             torch.tensor([0, 0]), 1)
    _, diag = projection_loss(s_m, t_m, path, split, columns, log_floor=None, exclusive=True)
    assert diag["projected_pairs"] == 1.0  # "12" is still projected through the chain rule
    assert diag["teacher_mass_moved"] == 0.0


def test_exclusive_prefixes_count_each_string_once():
    """Teacher path "5","3","9" (one digit per token) against a student with every 1-, 2- and 3-digit token (cl100k's
    numerals): with exclusive prefixes the teacher's values over the student's first token sum to exactly 1, where
    the plain chain rule counts the strings that start "5" up to three times (on "5", "5x" and "53x")."""
    from gold_pipeline.losses.projection import exclusive_prefix_logprobs, projected_teacher_logprobs

    vt = 10
    pieces = {10 + 10 * a + b: [a, b] for a in range(10) for b in range(10)}
    pieces |= {110 + 100 * a + 10 * b + c: [a, b, c] for a in range(10) for b in range(10) for c in range(10)}
    columns = projection_columns(pieces, 1110, vt)
    torch.manual_seed(0)
    t_lp = torch.log_softmax(torch.randn(3, vt, dtype=torch.float64) * 2, 1)  # rows predicting "5", "3", "9"
    path = teacher_path_from_logits(t_lp, torch.tensor([5, 3, 9]), torch.tensor([0, 0, 0]), 1, columns.depth)
    g_idx, p_idx = live_pairs(path.ids, columns)
    plain, _ = projected_teacher_logprobs(path, columns, g_idx, p_idx)
    exclusive, share, first = exclusive_prefix_logprobs(path, columns, g_idx, p_idx, plain, 1)
    p_first = t_lp[0].exp()
    assert float(first[0]) == pytest.approx(float(p_first[5]))
    matched = p_first.sum() - share[0] * p_first[5]  # the ten single digits, "5" lowered
    assert float(matched + exclusive.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(p_first.sum() + plain.exp().sum()) > 1.0 + 0.5 * float(p_first[5])
    assert float(share[0]) == pytest.approx(1.0)  # every continuation of "5" is a digit: a 2-digit token
    got = {int(columns.student_ids[p]): float(v) for p, v in zip(p_idx, exclusive)}
    p2 = t_lp[1].exp()
    assert math.exp(got[10 + 53]) == pytest.approx(float(p_first[5] * p2[3] * (1 - t_lp[2].exp().sum())), abs=1e-12)
    assert got[10 + 54] == pytest.approx(float(t_lp[0, 5] + t_lp[1, 4]))  # "54": off the path after "5", untouched
    assert got[110 + 539] == pytest.approx(float(t_lp[0, 5] + t_lp[1, 3] + t_lp[2, 9]))  # a leaf: untouched


def test_default_projected_weight_is_the_matched_weight():
    split, columns, s_m, t_m, path = _tiny_case()
    _, diag = projection_loss(s_m, t_m, path, split, columns)
    assert diag["matched_weight"] == pytest.approx(3 / 4)
    assert diag["projected_weight"] == diag["matched_weight"]


def test_multi_digit_student_token_gets_chain_rule_teacher_probability():
    """Student "123" vs teacher "1","2","3": P(1)P(2|1)P(3|12) for "123", P(1)P(2|1)P(x|12) for "12x", P(1)P(x|1)
    for "1x"; "45x" (first piece off the path) is not live."""
    # teacher 0..9 = digits; student 0..9 digits, 10 "12", 11 "123", 12 "124", 13 "456", 14 "13"
    vt, vs = 10, 15
    pieces = {10: [1, 2], 11: [1, 2, 3], 12: [1, 2, 4], 13: [4, 5, 6], 14: [1, 3]}
    columns = projection_columns(pieces, vs, vt)
    torch.manual_seed(0)
    t_lp = torch.log_softmax(torch.randn(3, vt, dtype=torch.float64), 1)  # rows predicting "1", "2", "3"
    t_ids, t_groups = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])
    path = teacher_path_from_logits(t_lp, t_ids, t_groups, 1, columns.depth)
    g_idx, p_idx = live_pairs(path.ids, columns)
    live = {int(columns.student_ids[p]) for p in p_idx}
    assert live == {10, 11, 12, 14}
    from gold_pipeline.losses.projection import projected_teacher_logprobs

    values, _ = projected_teacher_logprobs(path, columns, g_idx, p_idx)
    got = {int(columns.student_ids[p]): float(v) for p, v in zip(p_idx, values)}
    assert got[11] == pytest.approx(float(t_lp[0, 1] + t_lp[1, 2] + t_lp[2, 3]))
    assert got[12] == pytest.approx(float(t_lp[0, 1] + t_lp[1, 2] + t_lp[2, 4]))
    assert got[10] == pytest.approx(float(t_lp[0, 1] + t_lp[1, 2]))
    assert got[14] == pytest.approx(float(t_lp[0, 1] + t_lp[1, 3]))


def test_pairs_never_read_rows_past_the_group_end():
    """A two-token teacher group cannot evaluate a three-piece student token (its last row is another group's)."""
    columns = projection_columns({10: [1, 2, 3], 11: [1, 2]}, 12, 10)
    path_ids = torch.tensor([[1, 2, -1]])
    _, p_idx = live_pairs(path_ids, columns)
    assert [int(columns.student_ids[p]) for p in p_idx] == [11]


def _batch(seed: int, groups: int = 6, vs: int = 12, vt: int = 10):
    """Random batch: group g has one student token and 1..3 teacher tokens; digit-like pieces."""
    gen = torch.Generator().manual_seed(seed)
    t_counts = torch.randint(1, 4, (groups,), generator=gen)
    t_ids = torch.randint(0, vt, (int(t_counts.sum()),), generator=gen)
    t_groups = torch.repeat_interleave(torch.arange(groups), t_counts)
    s_ids = torch.randint(0, vs, (groups,), generator=gen)
    s_groups = torch.arange(groups)
    s_logits = torch.randn(groups, vs, dtype=torch.float64, generator=gen) * 2
    t_logits = torch.randn(t_ids.numel(), vt, dtype=torch.float64, generator=gen) * 2
    # student ids 0..5 match teacher ids 0..5; 6..11 spell teacher sequences built from the batch's own paths
    vocab_map = [[i, i] for i in range(6)]
    pieces = {6: [0, 1], 7: [1, 2, 3], 8: [2, 2], 9: [3, 4, 5], 10: [int(t_ids[0]), int(t_ids[1])]}
    for g in range(groups):  # make a few pairs live: the group's own first two teacher tokens
        idx = (t_groups == g).nonzero().squeeze(1)
        if idx.numel() >= 2:
            pieces[11] = [int(t_ids[idx[0]]), int(t_ids[idx[1]])]
    return s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vocab_map, pieces, vs, vt


def _loss(s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns, **kw):
    s_m = merged_logprobs(torch.log_softmax(s_logits, 1), s_ids, s_groups, groups)
    t_lp = torch.log_softmax(t_logits, 1)
    t_m = merged_logprobs(t_lp, t_ids, t_groups, groups)
    path = teacher_path_from_logits(t_logits, t_ids, t_groups, groups, columns.depth)
    return projection_loss(s_m, t_m, path, split, columns, **kw)


def test_gradcheck_float64():
    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(1, groups=4)
    split, columns = vocab_split(vmap, vs, vt), projection_columns(pieces, vs, vt)
    _, diag = _loss(s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns)
    assert diag["projected_pairs"] > 0  # the check covers the projected part

    def f(x):
        return _loss(x, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns, beta=0.3,
                     log_floor=None)[0]

    assert torch.autograd.gradcheck(f, (s_logits.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_equals_unchunked(chunk):
    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(2)
    split, columns = vocab_split(vmap, vs, vt), projection_columns(pieces, vs, vt)
    x = s_logits.clone().requires_grad_()
    ref, ref_diag = _loss(x, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns)
    (ref_grad,) = torch.autograd.grad(ref, x)
    y = s_logits.clone().requires_grad_()
    teacher = ProjectionTeacherSide(MergeSide(t_logits, t_ids, t_groups), t_ids, columns.depth)
    fn = functools.partial(projection_chunk_loss, split=split, columns=columns)
    got, diag = chunked_merged_loss(MergeSide(y, s_ids, s_groups), teacher, groups, fn, groups_per_chunk=chunk)
    (grad,) = torch.autograd.grad(got, y)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    assert ref_diag["projected"] > 0
    assert diag["projected"] == pytest.approx(ref_diag["projected"], rel=1e-10)
    assert diag["teacher_mass_projected"] == pytest.approx(ref_diag["teacher_mass_projected"], rel=1e-10)


def test_gradient_accumulation_equals_one_big_batch():
    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(3)
    split, columns = vocab_split(vmap, vs, vt), projection_columns(pieces, vs, vt)
    x = s_logits.clone().requires_grad_()
    big, _ = _loss(x, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns)
    big.backward()
    y = s_logits.clone().requires_grad_()
    total = 0.0
    cut = groups // 2
    for lo, hi in ((0, cut), (cut, groups)):
        s_sel = (s_groups >= lo) & (s_groups < hi)
        t_sel = (t_groups >= lo) & (t_groups < hi)
        part, _ = _loss(y[s_sel], t_logits[t_sel], s_ids[s_sel], t_ids[t_sel], s_groups[s_sel] - lo,
                        t_groups[t_sel] - lo, hi - lo, split, columns, denominator=groups)
        part.backward()
        total += float(part.detach())
    assert total == pytest.approx(float(big.detach()), rel=1e-10)
    assert torch.allclose(y.grad, x.grad, atol=1e-12)


def test_identical_tokenizers_reduce_to_plain_jsd():
    gen = torch.Generator().manual_seed(4)
    v, n = 7, 9
    s_logits, t_logits = torch.randn(n, v, generator=gen), torch.randn(n, v, generator=gen)
    ids, groups = torch.randint(0, v, (n,), generator=gen), torch.arange(n)
    split = vocab_split([[i, i] for i in range(v)], v, v)
    columns = projection_columns({}, v, v)
    loss, diag = _loss(s_logits, t_logits, ids, ids, groups, groups, n, split, columns, beta=0.5,
                       matched_weight=1.0, unmatched_weight=0.0)
    plain, _ = generalized_jsd_loss(s_logits, t_logits, beta=0.5)
    assert float(loss) == pytest.approx(float(plain), rel=1e-5)
    assert diag["projected_pairs"] == 0.0


def _topk_path(t_logits, t_ids, t_groups, groups, depth, k):
    t_lp = torch.log_softmax(t_logits, 1)
    top_lp, top_ids = t_lp.topk(k, dim=1)
    token_lp = t_lp.gather(1, t_ids.unsqueeze(1)).squeeze(1)
    merged = merged_topk(top_ids, top_lp, token_lp, t_groups, groups)
    return merged, teacher_path_from_topk(top_ids, top_lp, token_lp, t_ids, t_groups, groups, depth)


def test_topk_with_k_equal_to_the_vocabulary_equals_the_online_loss():
    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(5)
    s_logits, t_logits = s_logits.float(), t_logits.float()
    split, columns = vocab_split(vmap, vs, vt), projection_columns(pieces, vs, vt)
    online, online_diag = _loss(s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns)
    s_m = merged_logprobs(torch.log_softmax(s_logits, 1), s_ids, s_groups, groups)
    merged, path = _topk_path(t_logits, t_ids, t_groups, groups, columns.depth, vt)
    cached, diag = projection_loss(s_m, merged, path, split, columns)
    assert float(cached) == pytest.approx(float(online), rel=1e-4)
    assert diag["projected"] == pytest.approx(online_diag["projected"], rel=1e-5)
    assert diag["projected_topk_error_bound"] == 0.0
    assert online_diag["teacher_mass_moved"] > 0  # the exclusive move is exercised on both forms
    assert diag["teacher_mass_moved"] == pytest.approx(online_diag["teacher_mass_moved"], rel=1e-5)


def test_topk_projected_part_error_is_within_its_bound():
    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(6)
    s_logits, t_logits = s_logits.float(), t_logits.float()
    split, columns = vocab_split(vmap, vs, vt), projection_columns(pieces, vs, vt)
    _, exact = _loss(s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, split, columns,
                     projected_weight=1.0, log_floor=None)
    s_m = merged_logprobs(torch.log_softmax(s_logits, 1), s_ids, s_groups, groups)
    merged, path = _topk_path(t_logits, t_ids, t_groups, groups, columns.depth, 2)
    _, cached = projection_loss(s_m, merged, path, split, columns, projected_weight=1.0, log_floor=None)
    assert cached["projected_topk_error_bound"] > 0  # some last pieces fell outside the top-2
    assert abs(cached["projected"] - exact["projected"]) <= cached["projected_topk_error_bound"] + 1e-7


def test_last_position_merge_is_refused_with_a_sentence():
    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(7)
    side = ProjectionTeacherSide(MergeSide(t_logits, t_ids, t_groups), t_ids, 3)
    with pytest.raises(ValueError, match="first-position merge"):
        side.merged(0, groups, "last")


def test_chunked_topk_teacher_equals_the_direct_call():
    from gold_pipeline.losses.topk import TopkSide

    s_logits, t_logits, s_ids, t_ids, s_groups, t_groups, groups, vmap, pieces, vs, vt = _batch(8)
    s_logits, t_logits = s_logits.float(), t_logits.float()
    split, columns = vocab_split(vmap, vs, vt), projection_columns(pieces, vs, vt)
    t_lp = torch.log_softmax(t_logits, 1)
    top_lp, top_ids = t_lp.topk(4, dim=1)
    token_lp = t_lp.gather(1, t_ids.unsqueeze(1)).squeeze(1)
    s_m = merged_logprobs(torch.log_softmax(s_logits, 1), s_ids, s_groups, groups)
    merged, path = _topk_path(t_logits, t_ids, t_groups, groups, columns.depth, 4)
    ref, ref_diag = projection_loss(s_m, merged, path, split, columns)
    teacher = ProjectionTeacherSide(TopkSide(top_ids, top_lp, token_lp, t_groups), t_ids, columns.depth)
    fn = functools.partial(projection_chunk_loss, split=split, columns=columns)
    got, diag = chunked_merged_loss(MergeSide(s_logits, s_ids, s_groups), teacher, groups, fn, groups_per_chunk=2)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    assert diag["projected"] == pytest.approx(ref_diag["projected"], rel=1e-5)
    assert diag["projected_topk_error_bound"] == pytest.approx(ref_diag["projected_topk_error_bound"], rel=1e-5)


def test_teacher_matched_shift_equals_a_shifted_teacher_and_leaves_it_unchanged():
    from gold_pipeline.losses import hybrid_loss

    torch.manual_seed(0)
    s = torch.log_softmax(torch.randn(3, STUDENT_V, dtype=torch.float64), 1).requires_grad_()
    t = torch.log_softmax(torch.randn(3, TEACHER_V, dtype=torch.float64), 1)
    split = vocab_split(VOCAB_MAP, STUDENT_V, TEACHER_V)
    rows, teacher_ids, deltas = torch.tensor([0, 2]), torch.tensor([0, 2]), torch.tensor([-0.7, -2.0], dtype=t.dtype)
    before = t.clone()
    got, _ = hybrid_loss(s, t, split, teacher_matched_shift=(rows, split.teacher_to_matched("cpu")[teacher_ids],
                                                              deltas))
    assert torch.equal(t, before)
    shifted = t.index_put((rows, teacher_ids), t[rows, teacher_ids] + deltas)
    want, _ = hybrid_loss(s, shifted, split)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    assert torch.allclose(g1, g2)


@pytest.mark.parametrize("cached", [False, True])
def test_student_dropped_equals_a_student_masked_to_zero_probability(cached):
    """hybrid_loss(_topk)'s student_dropped removes the cells from the (G, Us) gather: same loss and gradient as the
    (G, Vs) -inf copy the projection loss used to make."""
    from gold_pipeline.losses import hybrid_loss
    from gold_pipeline.losses.topk import hybrid_loss_topk

    torch.manual_seed(0)
    s = torch.log_softmax(torch.randn(3, STUDENT_V, dtype=torch.float64), 1).requires_grad_()
    t = torch.log_softmax(torch.randn(3, TEACHER_V, dtype=torch.float64), 1)
    split = vocab_split(VOCAB_MAP, STUDENT_V, TEACHER_V)
    cells = (torch.tensor([0, 2, 2]), torch.tensor([2, 2, 4]))  # unmatched student ids "12", "21"
    if cached:
        top = torch.topk(t, 3, dim=1)
        token_lp = t.gather(1, top.indices[:, :1]).squeeze(1)  # one-token groups: the actual token's log-prob
        teacher = merged_topk(top.indices, top.values, token_lp, torch.arange(3), 3)

        def loss(x, **kw):
            return hybrid_loss_topk(x, teacher, split, **kw)[0]
    else:
        def loss(x, **kw):
            return hybrid_loss(x, t, split, **kw)[0]
    got = loss(s, student_dropped=cells)
    want = loss(s.index_put(cells, torch.tensor(-math.inf, dtype=s.dtype)))
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    assert torch.allclose(g1, g2) and torch.all(g1[cells] == 0)
    with pytest.raises(ValueError, match="matched student column"):
        loss(s, student_dropped=(torch.tensor([0]), torch.tensor([0])))


def test_row_logprob_cells_float32_kernel_matches_autograd():
    """The NumPy forward/backward of the projected student log-probs (rows wide enough for several chunks, repeated
    cells, unused rows) against plain torch autograd."""
    from gold_pipeline.losses.projection import _RowLogprobCells

    torch.manual_seed(0)
    x = (3 * torch.randn(7, 400_000)).requires_grad_()
    rows, cols = torch.tensor([0, 0, 3, 5, 5, 5]), torch.tensor([1, 7, 2, 9, 9, 399_999])
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25, 0.25, 3.0])
    got = _RowLogprobCells.apply(x, rows, cols)
    want = x[rows, cols] - torch.logsumexp(x[rows], 1)
    assert torch.allclose(got, want, atol=1e-5)
    g1, = torch.autograd.grad((got * weights).sum(), x)
    g2, = torch.autograd.grad((want * weights).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-7) and torch.all(g1[[1, 2, 4, 6]] == 0)
