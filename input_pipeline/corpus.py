"""The embedded default corpus: a small, deterministic synthetic language.

Every document is a function of `(seed, index)` only, so the corpus is random-access (a grain
`MapDataset` source), needs no files, and is identical on every host. A document is a few
lines, each one of five tasks that a tiny model can learn to different degrees:

- sentences: `the old cat sees two red boxes .` — small vocabularies, subject/verb number
  agreement (`cat sees` / `cats see`) and article/count agreement;
- arithmetic: `17+25=42`, `9*7=63`, `50-13=37` — the answer is a function of the prompt;
- key-value recall: `k=3 b=7 q=1 ? b -> 7` — the answer must be copied from earlier in the line;
- reversal: `rev hbda -> adbh`;
- sorting: `sort 5 1 4 -> 1 4 5`.

Documents are 20–400 bytes (uniform target length, whole lines only), so packing matters.
"""

from __future__ import annotations

import random

MIN_DOC_BYTES = 20
MAX_DOC_BYTES = 400

_ADJECTIVES = ("old", "red", "small", "happy", "quiet", "green", "big", "cold")
_NOUNS = ("cat", "dog", "bird", "box", "tree", "girl", "boy", "fish", "car", "lamp")
_VERBS = ("see", "like", "find", "push", "want", "hold", "draw", "move")
_COUNTS = ("two", "three", "four", "five")
_PLACES = ("in the park", "at home", "by the river", "on the hill", "near the school")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """Returns (phrase, plural)."""
    adj = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.5 else ""
    noun = rng.choice(_NOUNS)
    if rng.random() < 0.4:
        plural = noun + ("es" if noun.endswith(("x", "sh")) else "s")
        return f"{rng.choice(_COUNTS)} {adj}{plural}", True
    return f"{rng.choice(('the', 'a', 'my'))} {adj}{noun}", False


def _sentence(rng: random.Random) -> str:
    subject, plural = _noun_phrase(rng)
    verb = rng.choice(_VERBS)
    if not plural:
        verb = verb + ("es" if verb.endswith(("sh", "x", "ch")) else "s")
    obj, _ = _noun_phrase(rng)
    tail = f" {rng.choice(_PLACES)}" if rng.random() < 0.3 else ""
    return f"{subject} {verb} {obj}{tail} ."


def _arithmetic(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        return f"{a}*{b}={a * b}"
    a, b = rng.randrange(0, 100), rng.randrange(0, 100)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}={a - b}"
    return f"{a}+{b}={a + b}"


def _recall(rng: random.Random) -> str:
    keys = rng.sample(_LETTERS, rng.randrange(2, 7))
    values = [rng.randrange(10) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"{pairs} ? {keys[query]} -> {values[query]}"


def _reverse(rng: random.Random) -> str:
    word = "".join(rng.choice(_LETTERS[:8]) for _ in range(rng.randrange(3, 8)))
    return f"rev {word} -> {word[::-1]}"


def _sort(rng: random.Random) -> str:
    digits = [rng.randrange(10) for _ in range(rng.randrange(3, 7))]
    return f"sort {' '.join(map(str, digits))} -> {' '.join(map(str, sorted(digits)))}"


_TASKS = (_sentence, _arithmetic, _recall, _reverse, _sort)
_TASK_WEIGHTS = (4, 2, 2, 1, 1)


def document(seed: int, index: int) -> str:
    """The synthetic document `index` of the corpus `seed` (20–400 ASCII bytes)."""
    rng = random.Random(f"jaxmoe-corpus:{seed}:{index}")  # str seeds hash stably (sha512)
    target = rng.randrange(MIN_DOC_BYTES, MAX_DOC_BYTES + 1)
    # Each document leans towards one task, so earlier lines help predict later ones.
    favourite = rng.randrange(len(_TASKS))
    weights = [w * (4 if i == favourite else 1) for i, w in enumerate(_TASK_WEIGHTS)]
    lines: list[str] = []
    size = -1
    while True:
        line = rng.choices(_TASKS, weights)[0](rng)
        if lines and size + 1 + len(line) > target:
            break
        lines.append(line)
        size += 1 + len(line)
        if size >= target:
            break
    text = "\n".join(lines)
    while len(text) < MIN_DOC_BYTES:  # a single short line: add another
        text += "\n" + _arithmetic(rng)
    return text[:MAX_DOC_BYTES]


class SyntheticSource:
    """Random-access source of documents `[start, stop)` of the synthetic corpus.

    Records are `(location, text)`, the grain `RandomAccessDataSource` protocol.
    """

    def __init__(self, seed: int, start: int, stop: int):
        self._seed, self._start, self._stop = seed, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i: int) -> tuple[str, str]:
        index = self._start + int(i)
        return f"synthetic:{index}", document(self._seed, index)

    def __repr__(self) -> str:
        return f"SyntheticSource(seed={self._seed}, docs=[{self._start}, {self._stop}))"


def split_bounds(num_documents: int, eval_fraction: float, split: str) -> tuple[int, int]:
    """Document index range of a split: eval is the last `eval_fraction` (at least one doc)."""
    num_eval = min(num_documents - 1, max(1, round(num_documents * eval_fraction)))
    num_train = num_documents - num_eval
    return (0, num_train) if split == "train" else (num_train, num_documents)
