"""The small data sets the tests make themselves (the suite never needs ../shared): standard library only."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the king queen shall speak hear me good lord sweet love night day fair death".split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """A small play-like text with a learnable structure."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["KING", "QUEEN", "LORD"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + ".\n")
    return "\n".join(lines)


POSITIVE = "a gorgeous , moving film|wonderful and funny|the best acting of the year|sweet , smart and touching".split(
    "|"
)
NEGATIVE = "dull and lifeless|a boring , ugly mess|the worst script ever|it does n't work at all".split("|")


def make_sst_rows(n: int = 200, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append((rng.choice(POSITIVE if label else NEGATIVE), label))
    return rows


def write_sst(path: Path, rows: list[tuple[str, int]], text_column: str = "sentence") -> Path:
    path.write_text(f"label\t{text_column}\n" + "".join(f"{label}\t{text}\n" for text, label in rows))
    return path
