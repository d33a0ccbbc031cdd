"""Verifiable tasks with exact answers: prompt generators and scorers for the quality benchmark.

A prompt row is `{"messages": [system, user], "answer": str, "task": name}`; any file of such rows (one per
line) plugs into the benchmark, so held-out sets made elsewhere are scored the same way.

    arith       multi-digit +, -, x (2-4 digit operands): tokenizers split numbers differently
    arith2      two-digit + and - (where a 135M student is sometimes right before training)
    gsm         two- or three-step word problems with integer answers (GSM8K-style templates)
    countdown   reach a target from 3-4 given numbers with + - * / (the GOLD blog's task); any correct
                expression counts, not only the stored one

Every answer is read from the completion's last "Answer: ..." line (else its last number, for arith/gsm).
Written here rather than taken from reasoning-gym: its generators pull in a dependency tree gold does not need,
and the scorers must be exact and small enough to read.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

ANSWER_LINE = re.compile(r"answer\s*[:=]\s*(.+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    name: str
    system: str
    make: Callable[[random.Random], tuple[str, str]]   # rng -> (question, reference answer)
    score: Callable[[str, str, str], bool]             # (completion, answer, question) -> correct


# -- reading answers --------------------------------------------------------------------------------------


def answer_text(completion: str) -> str | None:
    """The text after the last "Answer:" of a completion (first line of it), or None."""
    matches = ANSWER_LINE.findall(completion)
    return matches[-1].strip().splitlines()[0].strip() if matches else None


def final_number(completion: str) -> int | None:
    """The integer a completion answers: the first number after its last "Answer:", else its last number."""
    text = answer_text(completion)
    after = NUMBER.findall(text) if text else []
    anywhere = NUMBER.findall(completion)
    pick = after[0] if after else (anywhere[-1] if anywhere else None)
    if pick is None:
        return None
    value = float(pick.rstrip(",").replace(",", ""))
    return int(value) if value.is_integer() else None


def score_number(completion: str, answer: str, question: str = "") -> bool:
    return final_number(completion) == int(answer)


# -- arithmetic ---------------------------------------------------------------------------------------------


def make_arith(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(100, 9999), rng.randint(100, 999)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a = rng.randint(1000, 9999)
        b = rng.randint(100, a - 1)
        return f"What is {a} - {b}?", str(a - b)
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    return f"What is {a} * {b}?", str(a * b)


def make_arith2(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition or subtraction (the easier arithmetic: a 135M student gets some right before training)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


# -- GSM-style word problems ---------------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena")


def _gsm_bakery(rng, name):
    a, d, s = rng.randint(12, 60), rng.randint(3, 9), rng.randint(5, 40)
    return (f"{name} bakes {a} loaves of bread every day for {d} days and gives away {s} loaves in total. "
            f"How many loaves does {name} have left?", a * d - s)


def _gsm_shop(rng, name):
    n, p = rng.randint(3, 12), rng.randint(4, 25)
    paid = (n * p // 50 + 1) * 50
    return (f"{name} buys {n} notebooks at {p} dollars each and pays with {paid} dollars. "
            f"How much change does {name} get, in dollars?", paid - n * p)


def _gsm_trip(rng, name):
    speed, hours, extra = rng.randint(30, 90), rng.randint(2, 7), rng.randint(10, 80)
    return (f"{name} drives at {speed} km per hour for {hours} hours, then walks {extra} km more. "
            f"How many km does {name} travel in all?", speed * hours + extra)


def _gsm_split(rng, name):
    groups, each, left = rng.randint(3, 9), rng.randint(6, 15), rng.randint(1, 5)
    total = groups * each + left
    return (f"{name} has {total} stickers and shares them equally among {groups} friends, keeping the "
            f"{left} that are left over. How many stickers does each friend get?", each)


def _gsm_savings(rng, name):
    weekly, weeks, spent = rng.randint(5, 30), rng.randint(4, 12), rng.randint(10, 60)
    return (f"{name} saves {weekly} dollars a week for {weeks} weeks, then spends {spent} dollars on a gift "
            f"and doubles what is left by working extra. How many dollars does {name} have now?",
            2 * (weekly * weeks - spent))


_GSM_TEMPLATES = (_gsm_bakery, _gsm_shop, _gsm_trip, _gsm_split, _gsm_savings)


def make_gsm(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(_GSM_TEMPLATES)
    question, answer = template(rng, rng.choice(_NAMES))
    return question, str(answer)


# -- Countdown -----------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {operator.add: "+", operator.sub: "-", operator.mul: "*"}


def make_countdown(rng: random.Random) -> tuple[str, str]:
    """3-4 numbers and a target that one left-to-right expression over all of them reaches (+, -, *, positive
    integers on the way); the stored answer is that expression."""
    while True:
        numbers = [rng.randint(1, 25) for _ in range(rng.choice((3, 4)))]
        order = rng.sample(numbers, len(numbers))
        value, text, positive = order[0], str(order[0]), True
        for n in order[1:]:
            op = rng.choice(list(_SYMBOLS))
            value = op(value, n)
            positive &= value > 0
            text = f"({text} {_SYMBOLS[op]} {n})" if op is not operator.mul else f"{text} * {n}"
        if positive and 10 <= value <= 500:
            question = (f"Using the numbers {', '.join(map(str, numbers))}, each at most once, and + - * /, "
                        f"make {value}.")
            return question, text


def countdown_numbers(question: str) -> tuple[list[int], int]:
    """(available numbers, target) of a countdown question made by make_countdown."""
    match = re.search(r"numbers ([\d, ]+), each.*make (\d+)", question)
    if not match:
        raise ValueError(f"not a countdown question: {question!r}")
    return [int(n) for n in match.group(1).split(",")], int(match.group(2))


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals of an arithmetic expression (+ - * / and parentheses only), or None
    when it is anything else or divides by zero."""
    try:
        tree = ast.parse(text.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        return None
    literals: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return Fraction(_OPS[type(node.op)](left, right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError("not arithmetic")

    try:
        return walk(tree.body), literals
    except (ValueError, ZeroDivisionError):
        return None


def score_countdown(completion: str, answer: str, question: str) -> bool:
    """Correct when the expression after the last "Answer:" (up to an "=") uses only the given numbers, each at
    most once, and equals the target exactly."""
    text = answer_text(completion)
    if text is None:
        return False
    numbers, target = countdown_numbers(question)
    result = evaluate_expression(text.split("=")[0].strip().rstrip("."))
    if result is None:
        return False
    value, literals = result
    pool = list(numbers)
    for n in literals:
        if n not in pool:
            return False
        pool.remove(n)
    return value == target


TASKS: dict[str, Task] = {
    "arith": Task("arith", "You are a calculator. Answer with a short calculation and end with 'Answer: <number>'.",
                  make_arith, score_number),
    "arith2": Task("arith2", "You are a calculator. Answer with a short calculation and end with 'Answer: <number>'.",
                   make_arith2, score_number),
    "gsm": Task("gsm", "Solve the problem step by step, then end with 'Answer: <number>'.", make_gsm, score_number),
    "countdown": Task("countdown", "Find an expression that reaches the target. End with 'Answer: <expression>'.",
                      make_countdown, score_countdown),
}  # fmt: skip


# -- rows and accuracy -----------------------------------------------------------------------------------------


def make_rows(task: str, count: int, seed: int, *, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` distinct prompt rows of `task` (none whose question is in `exclude`), fixed by `seed`."""
    spec = TASKS[task]
    rng = random.Random(f"{task}:{seed}")
    rows, seen = [], set(exclude)
    while len(rows) < count:
        question, answer = spec.make(rng)
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "system", "content": spec.system}, {"role": "user", "content": question}]
        rows.append({"messages": messages, "answer": answer, "task": task})
    return rows


def row_question(row: dict) -> str:
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


def score_row(row: dict, completion: str) -> bool:
    """Whether `completion` answers prompt row `row` correctly (by its "task", default arith)."""
    return TASKS[row.get("task", "arith")].score(completion, str(row["answer"]), row_question(row))


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy correct/total (sound at 0 and at total)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def read_task_rows(path: str) -> list[dict]:
    """Prompt rows of a held-out or train file (jsonl/json/parquet): each must have `messages` and `answer` (the
    scorer needs it) and a known `task` (default arith). Bad rows raise GoldInputError naming the file and row."""
    from gold_pipeline.data.sources import iter_records
    from gold_pipeline.errors import GoldInputError, InvalidRow

    rows = []
    for index, record, location in iter_records(path):
        if isinstance(record, InvalidRow):
            raise GoldInputError(f"{location} (row {index}): {record.message}")
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or "answer" not in record:
            raise GoldInputError(f"{location} (row {index}): a task row needs \"messages\" (a list) and \"answer\" "
                                 "(the reference the scorer compares with); add them.")
        if record.get("task", "arith") not in TASKS:
            raise GoldInputError(f"{location} (row {index}): unknown task {record['task']!r}; choose from "
                                 f"{', '.join(TASKS)}.")
        rows.append(record)
    if not rows:
        raise GoldInputError(f"{path} holds no rows.")
    return rows
