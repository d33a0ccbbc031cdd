"""Verifiable tasks: generators are deterministic and disjoint; scorers read answers exactly."""

from __future__ import annotations

import pytest

from gold_pipeline.recipes.tasks import (
    TASKS,
    countdown_numbers,
    evaluate_expression,
    final_number,
    make_rows,
    row_question,
    score_row,
    wilson_interval,
)


def test_rows_are_seeded_distinct_and_exclude_a_train_set():
    for task in TASKS:
        train = make_rows(task, 40, seed=0)
        assert train == make_rows(task, 40, seed=0) and train != make_rows(task, 40, seed=1)
        questions = {row_question(r) for r in train}
        assert len(questions) == 40
        held = make_rows(task, 20, seed=1, exclude=questions)
        assert not questions & {row_question(r) for r in held}
        assert all(r["messages"][0]["role"] == "system" and r["task"] == task for r in held)


def test_reference_answers_score_correct_and_others_do_not():
    for task in TASKS:
        for row in make_rows(task, 30, seed=3):
            assert score_row(row, f"Let me work it out.\nAnswer: {row['answer']}"), row
            if task != "countdown":
                assert not score_row(row, f"Answer: {int(row['answer']) + 1}")


def test_final_number_reads_the_answer_line_else_the_last_number():
    assert final_number("12 + 30 = 42\nAnswer: 42.") == 42
    assert final_number("The total is 1,234") == 1234
    assert final_number("Answer: -7 apples (not 9)") == -7
    assert final_number("first 3 then 5") == 5 and final_number("no digits") is None
    assert final_number("Answer: 2.5") is None


def test_countdown_scorer_checks_numbers_target_and_syntax():
    row = {"messages": [{"role": "user", "content": "Using the numbers 3, 7, 25, each at most once, and + - * /, "
                                                   "make 46."}], "answer": "(25 - 3) + 7", "task": "countdown"}
    assert countdown_numbers(row_question(row)) == ([3, 7, 25], 46)
    assert score_row(row, "Answer: 25 * 3 - 7 * 4") is False          # 4 is not given
    assert score_row(row, "Answer: 7 * 7 - 3") is False               # 7 used twice
    assert score_row(row, "Answer: (25 - 3) * 7 / 7") is False        # 7 used twice
    assert score_row(row, "Answer: 25 + 3 * 7 = 46") is True          # any correct expression counts
    assert score_row(row, "Answer: __import__('os')") is False and score_row(row, "no answer") is False
    assert evaluate_expression("1 / 0") is None and evaluate_expression("7 / 2")[0] * 2 == 7


def test_wilson_interval_covers_the_rate_and_stays_in_bounds():
    low, high = wilson_interval(12, 24)
    assert low < 0.5 < high and 0.3 < low and high < 0.7
    assert wilson_interval(0, 24)[0] == 0.0 and 0 < wilson_interval(0, 24)[1] < 0.2
    assert wilson_interval(24, 24)[1] == pytest.approx(1.0) and wilson_interval(24, 24)[0] > 0.8
