"""The plan of one engine call and what comes back: the only things a scheduler and an
executor exchange (the shape of vLLM v1's `SchedulerOutput` / `ModelRunnerOutput`).

The scheduler (scheduling/) decides and holds no tensors; an executor (engine/step/executor.py
for the step loop, engine/static_decoding.py for whole batches) computes and keeps the device
state. Per engine call the scheduler sends one StepPlan and gets one StepOutputs back, with no
other call between them. Both are plain data that pickle: ids, prepared requests (token ids
and prompt metadata, never tensors) and results, so a plan can be logged, built by hand in a
test, or sent to an executor in another thread, process or rank.

A request is named by its `Handle`, an int the scheduler gives it once; an executor never
sees the scheduler's own request objects.

One call of `execute(plan)` does, in this order:
1. free the slots of `cancel` (the callers went away);
2. run `static` to completion on the static path (beam search, scoring of candidates
   (`GenerationRequest.choices`: one teacher-forced decoder pass, results carry
   `choice_logprobs`), and every batch of the `mixed` and `per_task` modes), one batch;
3. admit `admit` into free slots: one encoder forward for them;
4. one decoder step over the active rows: `run_first` are moved into the lowest rows, and the
   step runs the first `row_limit` rows (None: every active row). The others keep their slots
   and state and wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from promptmux.prompts.errors import PromptmuxError

from .types import BatchStats, GenerationResult, PreparedRequest

Handle = int
# A token of a static-path row as it is generated: (handle, token id). The static path's
# batch runs to completion inside one call, so a stream cannot wait for its StepOutputs.
TokenStream = Callable[[Handle, int], None]


@dataclass(frozen=True)
class StepPlan:
    cancel: tuple[Handle, ...] = ()
    static: tuple[tuple[Handle, PreparedRequest], ...] = ()
    admit: tuple[tuple[Handle, PreparedRequest], ...] = ()
    run_first: tuple[Handle, ...] = ()
    row_limit: int | None = None


@dataclass
class AdmissionStats:
    admitted: int  # requests that took a slot
    encoder_tokens: int  # encoder positions computed
    padding_fraction: float  # share of those positions that were padding
    seconds: float  # wall time of the admission (lease, encoder forward, cross K/V)


@dataclass
class DecodeStats:
    rows: int  # rows the decoder step ran
    waiting: int  # active rows that kept their slots and waited this step
    distinct_tasks: int  # distinct prompts among the rows that ran
    seconds: float  # wall time of the step (forward, sampling, the one host sync)


@dataclass
class StepOutputs:
    # The decoder step: the rows it ran, in row order, and the token each produced.
    stepped: list[Handle] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # Requests that ended in this call, each with its result (their slots are free already),
    # and requests that failed alone (a prompt that could not load, an encoder that failed).
    finished: dict[Handle, GenerationResult] = field(default_factory=dict)
    errors: dict[Handle, PromptmuxError] = field(default_factory=dict)
    active_slots: int = 0  # rows holding a request after the call
    admission: AdmissionStats | None = None
    decode: DecodeStats | None = None
    static: BatchStats | None = None  # the static batch, if the plan had one


class Executor(Protocol):
    """What a scheduler drives: one `execute` per engine call, on one thread."""

    slots: int  # requests the step loop can hold at once (0: the static path only)

    def execute(self, plan: StepPlan, stream: TokenStream | None = None) -> StepOutputs: ...
