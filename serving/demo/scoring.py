"""How the demo tasks are scored: every task's 200 fresh strings served in ONE mixed batch.

The build script writes these scores into `serving/assets/DEMO.md` (and the README quotes
them); the test suite recomputes them from the committed assets, so the published figures
are the ones the shipped files give.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from promptmux.serving.engine.core import BatchOutput, Engine
from promptmux.prompts.errors import PromptmuxError
from promptmux.serving.engine.types import GenerationParams, GenerationRequest

from promptmux.prompts.synthetic_tasks import Example, task_examples

DEMO_EVAL_SEED = 20_250
DEMO_EVAL_EXAMPLES = 200
DEMO_MAX_NEW_TOKENS = 40  # longer than any demo target (16 characters + EOS)


def demo_eval_examples(task: str) -> list[Example]:
    """The fixed scoring set of a demo task: 200 fresh strings, the same in tests and docs."""
    return task_examples(task, DEMO_EVAL_EXAMPLES, seed=DEMO_EVAL_SEED)


@dataclass
class MixedScore:
    scores: dict[str, float]  # task -> exact match 0..1
    rows: list[tuple[str, Example]]  # (task, example) in batch order
    requests: list[GenerationRequest]
    output: BatchOutput


def score_mixed_batch(engine: Engine, tenant: str, tasks: list[str]) -> MixedScore:
    """Shuffle every task's scoring strings into one batch, run it once, score each task."""
    rows = [(task, example) for task in tasks for example in demo_eval_examples(task)]
    random.Random(0).shuffle(rows)
    requests = [
        GenerationRequest(tenant=tenant, task=task, text=example.input, request_id=str(i),
                          params=GenerationParams(max_new_tokens=DEMO_MAX_NEW_TOKENS))
        for i, (task, example) in enumerate(rows)
    ]
    output = engine.run_batch(requests)
    failures = [result for result in output.results if isinstance(result, PromptmuxError)]
    if failures:
        raise failures[0]
    hits = {task: 0 for task in tasks}
    for (task, example), result in zip(rows, output.results):
        hits[task] += result.text == example.target
    scores = {task: hits[task] / DEMO_EVAL_EXAMPLES for task in tasks}
    return MixedScore(scores, rows, requests, output)
