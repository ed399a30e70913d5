"""Synthetic string tasks: what the embedded demo model is pretrained on and prompted for.

Inputs are random strings of 3-16 characters over a-z and 0-9. In pretraining each example
names its task in a text prefix ("reverse: abc" -> "cba"); a demo prompt replaces that
prefix, so a demo request sends the bare string ("abc").

`reverse-upper` is held out: it never appears in pretraining, and only prompt tuning
teaches it to the model.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

ALPHABET = string.ascii_lowercase + string.digits
MIN_CHARS = 3
MAX_CHARS = 16
VOWELS = frozenset("aeiou")
CAESAR_SHIFT = 3


@dataclass(frozen=True)
class Example:
    input: str
    target: str

    def to_json(self) -> str:
        return json.dumps({"input": self.input, "target": self.target})


@dataclass(frozen=True)
class SyntheticTask:
    name: str  # the task id, as served ("reverse-upper")
    apply: Callable[[str], str]
    description: str

    @property
    def prefix(self) -> str:
        """The text that names the task in pretraining ("reverse upper: ")."""
        return self.name.replace("-", " ") + ": "

    def example(self, text: str, *, with_prefix: bool) -> Example:
        source = self.prefix + text if with_prefix else text
        return Example(source, self.apply(text))


def _caesar(text: str) -> str:
    return "".join(
        chr((ord(c) - ord("a") + CAESAR_SHIFT) % 26 + ord("a")) if c.islower() else c for c in text
    )


def _reverse(text: str) -> str:
    return text[::-1]


def _upper(text: str) -> str:
    return text.upper()


def _rotate(text: str) -> str:
    return text[1:] + text[:1]


def _sort(text: str) -> str:
    return "".join(sorted(text))


def _compose(*steps: Callable[[str], str]) -> Callable[[str], str]:
    def composed(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return composed


_TASK_LIST = [
    SyntheticTask("copy", lambda s: s, "repeat the input unchanged"),
    SyntheticTask("reverse", _reverse, "the input backwards"),
    SyntheticTask("upper", _upper, "letters in upper case, digits unchanged"),
    SyntheticTask("sort", _sort, "characters in ASCII order (digits first)"),
    SyntheticTask("rotate", _rotate, "the first character moved to the end"),
    SyntheticTask("caesar", _caesar, f"each letter shifted {CAESAR_SHIFT} places on (z wraps to c), digits unchanged"),
    SyntheticTask("drop-vowels", lambda s: "".join(c for c in s if c not in VOWELS), "the input without a, e, i, o, u"),
    SyntheticTask("duplicate", lambda s: s + s, "the input twice"),
    SyntheticTask("length", lambda s: str(len(s)), "the number of characters, in decimal"),
    SyntheticTask("first", lambda s: s[:1], "the first character"),
    SyntheticTask("last", lambda s: s[-1:], "the last character"),
    # Composed tasks teach the model that task words combine.
    SyntheticTask("sort-upper", _compose(_sort, _upper), "sorted, then upper case"),
    SyntheticTask("reverse-caesar", _compose(_reverse, _caesar), "backwards, then Caesar-shifted"),
    SyntheticTask("rotate-upper", _compose(_rotate, _upper), "rotated, then upper case"),
    # Held out of pretraining: learnt by prompt tuning alone.
    SyntheticTask("reverse-upper", _compose(_reverse, _upper), "backwards and in upper case"),
    # Also held out: targets of the transfer study (benchmarks/prompt_science_study.py).
    SyntheticTask("rotate-caesar", _compose(_rotate, _caesar), "rotated, then Caesar-shifted"),
    SyntheticTask("duplicate-upper", _compose(lambda s: s + s, _upper), "the input twice, in upper case"),
    SyntheticTask("sort-caesar", _compose(_sort, _caesar), "sorted, then Caesar-shifted"),
]
TASKS: dict[str, SyntheticTask] = {task.name: task for task in _TASK_LIST}
HELD_OUT_TASKS = ("reverse-upper", "rotate-caesar", "duplicate-upper", "sort-caesar")

# Factorized prompts: a "language" is a final character map, a "task" an arrangement; the
# pair (language, task) maps the arranged string (arrangement first, then the map).
LANGUAGES: dict[str, Callable[[str], str]] = {"plain": lambda s: s, "upper": _upper, "caesar": _caesar}
ARRANGEMENTS: dict[str, Callable[[str], str]] = {
    "reverse": _reverse, "rotate": _rotate, "duplicate": lambda s: s + s, "sort": _sort,
}


def pair_examples(language: str, arrangement: str, count: int, *, seed: int,
                  exclude: Iterable[str] = ()) -> list[Example]:
    """Examples of one (language, arrangement) pair on fresh strings, none in `exclude`."""
    if language not in LANGUAGES or arrangement not in ARRANGEMENTS:
        raise ValueError(f"unknown pair {language}:{arrangement}; languages {sorted(LANGUAGES)}, "
                         f"arrangements {sorted(ARRANGEMENTS)}")
    task = SyntheticTask(f"{arrangement}-{language}",
                         _compose(ARRANGEMENTS[arrangement], LANGUAGES[language]), "factorized pair")
    return task_examples(task, count, seed=seed, exclude=exclude)
PRETRAINING_TASKS = tuple(name for name in TASKS if name not in HELD_OUT_TASKS)


def get_task(name: str) -> SyntheticTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic task {name!r}; known tasks: {', '.join(TASKS)}") from None


def random_string(rng: random.Random, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> str:
    return "".join(rng.choices(ALPHABET, k=rng.randint(min_chars, max_chars)))


def task_examples(
    task: str | SyntheticTask,
    count: int,
    *,
    seed: int,
    with_prefix: bool = False,
    exclude: Iterable[str] = (),
) -> list[Example]:
    """`count` examples of one task on fresh random strings, none of them in `exclude`.

    Strings are unique within the list, so a dev set drawn with `exclude=` the training
    inputs measures generalisation, not recall."""
    task = get_task(task) if isinstance(task, str) else task
    rng = random.Random(seed)
    seen = set(exclude)
    examples = []
    while len(examples) < count:
        text = random_string(rng)
        if text in seen:
            continue
        seen.add(text)
        examples.append(task.example(text, with_prefix=with_prefix))
    return examples


def pretraining_stream(
    seed: int, tasks: Iterable[str] = PRETRAINING_TASKS, weights: Iterable[float] | None = None
) -> Iterator[Example]:
    """An endless stream of prefixed examples over the pretraining tasks."""
    chosen = _pretraining_tasks(tasks)
    weights = list(weights) if weights is not None else [1.0] * len(chosen)
    rng = random.Random(seed)
    while True:
        task = rng.choices(chosen, weights=weights)[0]
        yield task.example(random_string(rng), with_prefix=True)


def pretraining_batches(
    seed: int,
    batch_size: int,
    tasks: Iterable[str] = PRETRAINING_TASKS,
    weights: Iterable[float] | None = None,
) -> Iterator[list[Example]]:
    """Endless batches of prefixed examples in which every string has the same length.

    Each batch still mixes tasks at random (batches of one task made the model learn far
    slower), while its inputs differ only by their prefixes, so little compute goes to
    padding. The string length is drawn uniformly per batch, as `random_string` draws it."""
    chosen = _pretraining_tasks(tasks)
    weights = list(weights) if weights is not None else [1.0] * len(chosen)
    rng = random.Random(seed)
    while True:
        length = rng.randint(MIN_CHARS, MAX_CHARS)
        batch_tasks = rng.choices(chosen, weights=weights, k=batch_size)
        yield [task.example("".join(rng.choices(ALPHABET, k=length)), with_prefix=True) for task in batch_tasks]


def _pretraining_tasks(tasks: Iterable[str]) -> list[SyntheticTask]:
    chosen = [get_task(name) for name in tasks]
    leaked = [task.name for task in chosen if task.name in HELD_OUT_TASKS]
    if leaked:
        raise ValueError(f"tasks {leaked} are held out of pretraining; remove them from `tasks`")
    return chosen


def write_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    with Path(path).open("w") as handle:
        for example in examples:
            handle.write(example.to_json() + "\n")
