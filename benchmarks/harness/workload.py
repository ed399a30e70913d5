"""What a benchmark sends: tasks and their prompts, tenants, task popularity, input and
output lengths. Everything is drawn from seeded generators, so a scenario is repeatable.

Tasks are spread over the tenants round-robin (task i belongs to tenant i mod T); a request
picks a task by popularity and is sent as that task's tenant. Prompts are random
`[length, d_model]` matrices, the same for a given (seed, tenant, task) on every run, so a
server that already holds them needs no new version.
"""
from __future__ import annotations

import bisect
import random
import string
import zlib
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Sequence

import torch

# Random prompts at the scale of the model's token embeddings (see serving/model/shapes.py).
PROMPT_STD = 0.05
_TEXT_ALPHABET = string.ascii_lowercase + " "


@dataclass(frozen=True)
class LengthSpec:
    """A length distribution: `fixed` (one value), `uniform` (inclusive [low, high]) or
    `choice` (uniform over listed values).

    Written in YAML as `16`, `{uniform: [8, 64]}` or `{choice: [1, 10, 100]}`; on the command
    line as `16`, `8:64` or `1,10,100`."""

    kind: str
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        expected = {"fixed": 1, "uniform": 2}
        if self.kind not in ("fixed", "uniform", "choice"):
            raise ValueError(f"unknown length distribution {self.kind!r}; expected fixed, uniform or choice")
        if self.kind in expected and len(self.values) != expected[self.kind]:
            raise ValueError(f"a {self.kind} length takes {expected[self.kind]} value(s), got {list(self.values)}")
        if not self.values or any(v < 1 for v in self.values):
            raise ValueError(f"lengths must be >= 1, got {list(self.values)}")
        if self.kind == "uniform" and self.values[0] > self.values[1]:
            raise ValueError(f"uniform length [{self.values[0]}, {self.values[1]}] has low > high")

    @classmethod
    def parse(cls, raw: Any) -> "LengthSpec":
        if isinstance(raw, LengthSpec):
            return raw
        if isinstance(raw, bool):
            raise ValueError(f"invalid length {raw!r}")
        if isinstance(raw, int):
            return cls("fixed", (raw,))
        if isinstance(raw, str):
            text = raw.strip()
            kind, sep = ("uniform", ":") if ":" in text else ("choice", ",") if "," in text else ("fixed", None)
            try:
                values = tuple(int(v) for v in text.split(sep) if v.strip())
            except ValueError:
                values = ()
            if values and (kind != "uniform" or len(values) == 2):
                return cls(kind, values)
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, values), = raw.items()
            values = values if isinstance(values, (list, tuple)) else [values]
            return cls(str(kind), tuple(int(v) for v in values))
        raise ValueError(
            f"cannot read length {raw!r}; write N (fixed), LOW:HIGH or {{uniform: [LOW, HIGH]}}, "
            "or A,B,C or {choice: [A, B, C]}"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "uniform":
            return rng.randint(self.values[0], self.values[1])
        return rng.choice(self.values)

    @property
    def max(self) -> int:
        return max(self.values)

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.values[0])
        if self.kind == "uniform":
            return f"uniform {self.values[0]}..{self.values[1]}"
        return "one of {" + ", ".join(map(str, self.values)) + "}"


@dataclass(frozen=True)
class Popularity:
    """How requests spread over tasks: `uniform`, `zipf` with exponent `s` (task of rank k
    drawn with probability proportional to k^-s), or `cycle` (tasks in turn, so any window
    of N consecutive requests names N different tasks)."""

    kind: str = "uniform"
    s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "zipf", "cycle"):
            raise ValueError(f"unknown popularity {self.kind!r}; expected uniform, zipf (e.g. zipf:1.1) or cycle")
        if self.kind == "zipf" and not self.s > 0:
            raise ValueError(f"zipf exponent s={self.s} must be > 0")

    @classmethod
    def parse(cls, raw: Any) -> "Popularity":
        if isinstance(raw, Popularity):
            return raw
        if isinstance(raw, dict) and set(raw) == {"zipf"}:
            return cls("zipf", float(raw["zipf"]))
        if isinstance(raw, str):
            kind, _, s = raw.partition(":")
            try:
                return cls(kind.strip(), float(s) if s else 1.0)
            except ValueError as error:
                raise ValueError(f"cannot read popularity {raw!r}: {error}") from None
        raise ValueError(f"cannot read popularity {raw!r}; write uniform, cycle, zipf:S or {{zipf: S}}")

    def weights(self, n: int) -> list[float]:
        if self.kind == "zipf":
            return [(k + 1) ** -self.s for k in range(n)]
        return [1.0] * n

    def describe(self) -> str:
        return f"zipf(s={self.s:g})" if self.kind == "zipf" else self.kind


@dataclass(frozen=True)
class WorkloadSpec:
    """The requests of one load stream."""

    tenants: tuple[str, ...] = ("bench",)
    tasks: int = 8
    popularity: Popularity = field(default_factory=Popularity)
    prompt_length: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", (20,)))
    input_length: LengthSpec = field(default_factory=lambda: LengthSpec("uniform", (16, 48)))  # characters
    output_length: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", (16,)))  # max_new_tokens
    task_prefix: str = "bench"
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept the written forms too (`"8:64"`, `"zipf:1.1"`, a tenant count), as from_dict does.
        for key in ("prompt_length", "input_length", "output_length"):
            object.__setattr__(self, key, LengthSpec.parse(getattr(self, key)))
        object.__setattr__(self, "popularity", Popularity.parse(self.popularity))
        object.__setattr__(self, "tenants", _tenant_names(self.tenants))
        if self.tasks < 1:
            raise ValueError(f"workload.tasks={self.tasks}; expected at least 1 task")
        if not self.tenants:
            raise ValueError("workload.tenants is empty; name at least one tenant")
        if self.tasks < len(self.tenants):
            raise ValueError(
                f"workload.tasks={self.tasks} is fewer than its {len(self.tenants)} tenants; tasks are spread "
                "over tenants round-robin, so give every tenant at least one task"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WorkloadSpec":
        names = set(cls.__dataclass_fields__)
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown workload key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
        return cls(**raw)

    def describe(self) -> str:
        return (
            f"{self.tasks} task(s) over {len(self.tenants)} tenant(s), {self.popularity.describe()} popularity, "
            f"prompt length {self.prompt_length.describe()}, input {self.input_length.describe()} chars, "
            f"output {self.output_length.describe()} tokens"
        )


def _tenant_names(tenants: Any) -> tuple[str, ...]:
    """A tenant count becomes `tenant0..`; one name or a list stays as named."""
    if isinstance(tenants, int) and not isinstance(tenants, bool):
        return tuple(f"tenant{i}" for i in range(tenants))
    if isinstance(tenants, str):
        return (tenants,)
    return tuple(str(t) for t in tenants)


@dataclass(frozen=True)
class TaskSpec:
    tenant: str
    task: str
    prompt_length: int
    seed: int

    def prompt(self, d_model: int) -> torch.Tensor:
        """The task's prompt: [prompt_length, d_model] float32, the same on every call."""
        generator = torch.Generator().manual_seed(self.seed)
        return PROMPT_STD * torch.randn(self.prompt_length, d_model, generator=generator)


def build_tasks(spec: WorkloadSpec) -> list[TaskSpec]:
    """The workload's tasks; task i belongs to tenant i mod T, its prompt length drawn from a
    generator seeded by (seed, i), and its name says the length so workloads never clash."""
    tasks = []
    for i in range(spec.tasks):
        rng = random.Random(f"{spec.seed}/{i}")
        length = spec.prompt_length.sample(rng)
        tenant = spec.tenants[i % len(spec.tenants)]
        name = f"{spec.task_prefix}-l{length}-{i:04d}"
        seed = zlib.crc32(f"{spec.seed}/{tenant}/{name}".encode())
        tasks.append(TaskSpec(tenant=tenant, task=name, prompt_length=length, seed=seed))
    return tasks


@dataclass(frozen=True)
class BenchRequest:
    tenant: str
    task: str
    prompt_length: int
    text: str
    max_new_tokens: int


class RequestSampler:
    """Draws the requests of one stream, in order, from its own seeded generator."""

    def __init__(
        self, spec: WorkloadSpec, tasks: Sequence[TaskSpec] | None = None, seed: int | str | None = None
    ) -> None:
        self.spec = spec
        self.tasks = list(tasks if tasks is not None else build_tasks(spec))
        seed = spec.seed if seed is None else seed
        # Two generators: texts and lengths do not depend on how tasks are drawn, so two
        # workloads that differ only in their tasks send the same inputs.
        self._task_rng = random.Random(f"tasks/{seed}")
        self._rng = random.Random(f"texts/{seed}")
        self._cumulative = list(accumulate(spec.popularity.weights(len(self.tasks))))
        self._next = 0

    def next_task(self) -> TaskSpec:
        if self.spec.popularity.kind == "cycle":
            task = self.tasks[self._next % len(self.tasks)]
            self._next += 1
            return task
        point = self._task_rng.random() * self._cumulative[-1]
        return self.tasks[bisect.bisect_right(self._cumulative, point)]

    def next(self) -> BenchRequest:
        task = self.next_task()
        chars = self.spec.input_length.sample(self._rng)
        text = "".join(self._rng.choice(_TEXT_ALPHABET) for _ in range(chars - 1)) + self._rng.choice(string.ascii_lowercase)
        return BenchRequest(
            tenant=task.tenant,
            task=task.task,
            prompt_length=task.prompt_length,
            text=text,
            max_new_tokens=self.spec.output_length.sample(self._rng),
        )
