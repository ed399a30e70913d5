"""Write a synthetic task's examples as the JSONL that `promptmux prompts train` reads.

    python -m promptmux.prompts.make_task_data reverse-caesar --count 2000 --seed 1 train.jsonl
    python -m promptmux.prompts.make_task_data reverse-caesar --count 200 --seed 2 \\
        --exclude train.jsonl dev.jsonl

Each line is {"input": "abc", "target": "..."}: bare strings, no task prefix, as a demo
request sends them. `--list` names every task.

Factorized-prompt data (`promptmux prompts train-factorized`): `--pairs LANG:TASK,...` writes
`--count` rows per pair, each with "language" and "task" fields; languages are final
character maps (plain, upper, caesar), tasks are arrangements (reverse, rotate, duplicate, sort):

    python -m promptmux.prompts.make_task_data --pairs upper:reverse,caesar:rotate --count 500 pairs.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import json

from .synthetic_tasks import ARRANGEMENTS, LANGUAGES, TASKS, pair_examples, task_examples, write_jsonl
from .tuning import read_jsonl


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", help="a synthetic task id (see --list)")
    parser.add_argument("output", nargs="?", type=Path, help="JSONL file to write")
    parser.add_argument("--count", type=int, default=1000, help="how many examples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the strings")
    parser.add_argument("--exclude", type=Path, help="a JSONL file whose inputs must not appear (a train set)")
    parser.add_argument("--list", action="store_true", help="print every task id and what it does")
    parser.add_argument("--pairs", help="factorized data: comma-separated LANG:TASK pairs (then give only OUTPUT)")
    args = parser.parse_intermixed_args(argv)  # options may sit between TASK and OUTPUT
    if args.pairs:
        return _write_pairs(parser, args)
    if args.list:
        for name, task in TASKS.items():
            print(f"{name:22s} {task.description}")
        return 0
    if not args.task or not args.output:
        parser.error("give a TASK and an OUTPUT file (or --list)")
    if args.task not in TASKS:
        parser.error(f"unknown task {args.task!r}; known tasks: {', '.join(TASKS)}")
    if args.count < 1:
        parser.error(f"--count {args.count}: expected at least 1")
    excluded = [example.input for example in read_jsonl(args.exclude)] if args.exclude else []
    examples = task_examples(args.task, args.count, seed=args.seed, exclude=excluded)
    write_jsonl(examples, args.output)
    print(f"wrote {len(examples)} {args.task} examples to {args.output}")
    return 0


def _write_pairs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    output = args.output or (Path(args.task) if args.task else None)
    if output is None or (args.task and args.output):
        parser.error("with --pairs give only the OUTPUT file")
    pairs = [tuple(item.split(":", 1)) for item in args.pairs.split(",") if item]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in LANGUAGES or pair[1] not in ARRANGEMENTS:
            parser.error(f"--pairs item {':'.join(pair)!r}: expected LANG:TASK with LANG in {sorted(LANGUAGES)} "
                         f"and TASK in {sorted(ARRANGEMENTS)}")
    excluded = [example.input for example in read_jsonl(args.exclude)] if args.exclude else []
    with output.open("w") as handle:
        for i, (language, task) in enumerate(pairs):
            for example in pair_examples(language, task, args.count, seed=args.seed * 1000 + i, exclude=excluded):
                handle.write(json.dumps({"language": language, "task": task, "input": example.input,
                                         "target": example.target}) + "\n")
    print(f"wrote {args.count} examples of each of {len(pairs)} pairs to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
