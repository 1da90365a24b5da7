"""Deterministic domain text for the built-in example, from texts shipped in ``examples/texts/``.

Three domains:

* ``python``: excerpts of Python's standard library (``python.jsonl``);
* ``legal``: excerpts of licence texts and Debian copyright files (``legal.jsonl``);
* ``math``: generated arithmetic and word problems with worked answers.

Each domain is split three ways ("train", "prompts", "heldout"). The shipped texts record their split
(fixed when they were frozen, by hashing the source file name, so the splits never share a source file);
math problems are bucketed by hashing the problem text, so the splits never share one. Shipping the texts
keeps every figure made from them independent of what a machine has installed; ``examples/texts/README.md``
says where they come from and under which licences.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

DOMAINS = ("python", "legal", "math")
SPLITS = ("train", "prompts", "heldout")
MAX_CHUNKS_PER_FILE = 8  # per pass over the files, so no single big file dominates a split
TEXTS = Path(__file__).resolve().parent / "texts"


def _bucket(key: str) -> str:
    """Split that ``key`` belongs to; md5 so it is stable across runs and machines."""
    return SPLITS[hashlib.md5(key.encode("utf-8")).digest()[0] % len(SPLITS)]


def _check(domain: str, split: str) -> None:
    """Reject unknown domain or split names early with a clear message."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


@cache
def _documents(domain: str) -> dict[str, list[tuple[str, str]]]:
    """The shipped (source, text) documents of a file-based domain, by split, in file order."""
    out: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    with (TEXTS / f"{domain}.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            out[row["split"]].append((row["source"], row["text"]))
    return out


def chunk_lines(text: str, chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chars`` characters, only at line ends.

    Over-long single lines are hard-cut so no chunk runs far past ``chars``;
    a short tail is dropped unless it is the only piece.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line = line[:chars]
        current.append(line)
        size += len(line)
        if size >= chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current and (size >= chars // 4 or not chunks):
        chunks.append("".join(current))
    return [c for c in chunks if c.strip()]


def _file_chunks(
    documents: list[tuple[str, str]], n: int, chars: int, seed: int, per_file: int = MAX_CHUNKS_PER_FILE
) -> list[str]:
    """Up to ``n`` chunks from ``documents`` (source, text), chunked lazily in a seeded order.

    Each pass takes at most ``per_file`` chunks from every document, so the result
    mixes many files; later passes take more if ``n`` needs it.
    """
    rng = random.Random(seed)
    order = list(documents)
    rng.shuffle(order)
    pieces_of: dict[str, list[str]] = {}
    out: list[str] = []
    start = 0
    while len(out) < n:
        added = False
        for source, text in order:
            if source not in pieces_of:
                pieces = chunk_lines(text, chars)
                random.Random(f"{seed}:{source}").shuffle(pieces)
                pieces_of[source] = pieces
            taken = pieces_of[source][start : start + per_file]
            out.extend(taken)
            added = added or bool(taken)
            if len(out) >= n:
                break
        if not added:
            break
        start += per_file
    return out[:n]


_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon")
_ITEMS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells")


def _math_problem(rng: random.Random) -> str:
    """One problem plus its worked answer, as two lines."""
    kind = rng.randrange(8)
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 60)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        return f"Question: What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}."
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"Question: What is {hi} - {lo}?\nAnswer: {hi} - {lo} = {hi - lo}."
    if kind == 2:
        return f"Question: What is {a} * {c}?\nAnswer: {a} * {c} = {a * c}."
    if kind == 3:
        q, r = divmod(a, c)
        return (
            f"Question: What is {a} divided by {c}?\n"
            f"Answer: {a} = {c} * {q} + {r}, so the quotient is {q} remainder {r}."
        )
    if kind == 4:
        gain, loss = rng.randint(1, 50), rng.randint(1, 40)
        start = rng.randint(loss, 120)
        total = start + gain - loss
        return (
            f"Question: {name} has {start} {item}, gets {gain} more and gives away {loss}. "
            f"How many {item} does {name} have now?\n"
            f"Answer: {start} + {gain} - {loss} = {total}, so {name} has {total} {item}."
        )
    if kind == 5:
        w, h = rng.randint(2, 40), rng.randint(2, 40)
        return (
            f"Question: A rectangle is {w} m wide and {h} m long. What are its area and perimeter?\n"
            f"Answer: Area = {w} * {h} = {w * h} square metres; perimeter = 2 * ({w} + {h}) = {2 * (w + h)} m."
        )
    if kind == 6:
        pct = rng.choice((5, 10, 15, 20, 25, 40, 50, 75))
        base = rng.randint(1, 40) * 20
        return f"Question: What is {pct}% of {base}?\nAnswer: {pct} / 100 * {base} = {pct * base // 100}."
    values = [rng.randint(1, 100) for _ in range(rng.randint(3, 5))]
    total = sum(values)
    listed = ", ".join(map(str, values))
    return (
        f"Question: What is the sum and the mean of {listed}?\n"
        f"Answer: The sum is {' + '.join(map(str, values))} = {total}; the mean is {total} / {len(values)} = "
        f"{total / len(values):g}."
    )


def _math_items(split: str, seed: int) -> Iterator[str]:
    """Endless stream of problems whose hash falls in ``split``; splits never share one."""
    rng = random.Random(f"math:{seed}")
    seen: set[str] = set()
    while True:
        problem = _math_problem(rng)
        if problem not in seen and _bucket(problem) == split:
            seen.add(problem)
            yield problem


def _math_chunks(split: str, n: int, chars: int, seed: int) -> list[str]:
    """``n`` chunks of about ``chars`` characters, each several problems separated by blank lines."""
    items = _math_items(split, seed)
    out: list[str] = []
    for _ in range(n):
        parts: list[str] = []
        while sum(len(p) + 2 for p in parts) < chars:
            parts.append(next(items))
        out.append("\n\n".join(parts) + "\n")
    return out


def domain_texts(domain: str, split: str, n: int, chars: int = 800, seed: int = 0) -> list[str]:
    """``n`` text chunks of about ``chars`` characters from one split of one domain.

    May return fewer than ``n`` only if a file-based split runs out of text.
    """
    return _texts(domain, split, n, chars, seed, MAX_CHUNKS_PER_FILE)


def _texts(domain: str, split: str, n: int, chars: int, seed: int, per_file: int) -> list[str]:
    """``domain_texts`` with a tunable per-file cap (1 gives the most varied prompts)."""
    _check(domain, split)
    if domain == "math":
        return _math_chunks(split, n, chars, seed)
    return _file_chunks(_documents(domain)[split], n, chars, seed, per_file)


def _python_snippet(chunk: str) -> list[str]:
    """A ``def``/``class`` line and the next lines; else the chunk's first lines."""
    lines = [ln.rstrip() for ln in chunk.splitlines()]
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("def ", "class ")):
            return [ln for ln in lines[i : i + 3] if ln.strip()]
    return [ln for ln in lines if ln.strip()][:3]


def _legal_snippet(chunk: str) -> list[str]:
    """First paragraph with real prose (not a bare field or rule line), up to three lines."""
    paragraphs = [p for p in chunk.split("\n\n") if p.strip()]
    for para in paragraphs:
        lines = [ln.strip(" \t.") for ln in para.splitlines() if ln.strip(" \t.")]
        if sum(ch.isalpha() for ch in " ".join(lines)) >= 40:
            return lines[:3]
    return [ln.strip() for ln in chunk.splitlines() if ln.strip()][:3]


def _math_snippet(chunk: str) -> list[str]:
    """The first question of the chunk, without its answer."""
    return [next(ln for ln in chunk.splitlines() if ln.startswith("Question:"))]


_SNIPPETS: dict[str, Callable[[str], list[str]]] = {
    "python": _python_snippet,
    "legal": _legal_snippet,
    "math": _math_snippet,
}


def short_prompts(domain: str, n: int, seed: int = 0) -> list[str]:
    """``n`` short (1-3 line) prompt-like snippets from the "prompts" split.

    These are the recipe's positive prompts: text that should route to this
    domain's expert, drawn from files the adapter never trained on.
    """
    _check(domain, "prompts")
    out: list[str] = []
    seen: set[str] = set()
    for chunk in _texts(domain, "prompts", 4 * n + 8, chars=400, seed=seed, per_file=1):
        snippet = "\n".join(_SNIPPETS[domain](chunk))
        if snippet and snippet not in seen:
            seen.add(snippet)
            out.append(snippet)
        if len(out) == n:
            break
    return out
