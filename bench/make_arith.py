"""Write the multi-digit arithmetic prompt files of the quality benchmark (fixed seed, committed output).

    python bench/make_arith.py            # -> gold_pipeline/recipes/demo_data/arith_train.jsonl, gold_pipeline/recipes/demo_data/arith_heldout.jsonl

Each line: {"messages": [system, user], "answer": "<integer>"}. Operands are 2-4 digits, so the byte-level
BPE teacher (digits one by one) and the SentencePiece student (digits one by one after a "▁") split numbers
into different token runs. The held-out questions never appear in the train file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a calculator. Answer with a short calculation and end with 'Answer: <number>'."


def question(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(100, 9999), rng.randint(100, 999)
        return f"What is {a} + {b}?", a + b
    if kind == "sub":
        a = rng.randint(1000, 9999)
        b = rng.randint(100, a - 1)
        return f"What is {a} - {b}?", a - b
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    return f"What is {a} × {b}?", a * b


def make(n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        text, answer = question(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                     "answer": str(answer)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", type=Path, default=REPO / "gold_pipeline" / "recipes" / "demo_data")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    for name, n in (("arith_train.jsonl", args.train), ("arith_heldout.jsonl", args.heldout)):
        path = args.out_dir / name
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in make(n, rng, seen)),
                        encoding="utf-8")
        print(f"wrote {n} rows to {path}")


if __name__ == "__main__":
    main()
