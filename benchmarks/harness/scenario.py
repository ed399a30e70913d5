"""Scenario files: what to run, against which server options, and which ratios to report.

    name: mixed_vs_per_task
    description: ...
    model: {source: random:embedded}      # ModelConfig keys, for a harness-started server
    engine: {max_batch_size: 64}          # EngineConfig keys
    store: {refresh_interval_s: 2.0}      # StoreConfig keys (the harness picks the root)
    servers:                              # server variants: `serving` sections, by name
      mixed: {batching: mixed}
      per_task: {batching: per_task}
    defaults:                             # merged under every run and stream
      workload: {tasks: 64, prompt_length: 20}
      load: {mode: closed, concurrency: 64, duration_s: 10, warmup_s: 2}
    repeat: 2                             # each run again, interleaved: a b b a
    runs:
      - name: mixed
        target: server:mixed              # or engine:mixed (engine-direct, same batching)
      - name: per-task
        target: server:per_task
        workload: {popularity: uniform}
      - name: fairness
        streams:                          # several tenants' load at once
          - {name: steady, workload: {tenants: [steady]}, load: {mode: open, rate: 4}}
          - {name: flood, workload: {tenants: [flood]}, load: {concurrency: 128}}
    comparisons:
      - {name: "mixed / per-task", numerator: mixed, denominator: per-task,
         metric: throughput_rps, target: ">= 8"}

A `load.rate` or `load.concurrency` given as a list sweeps it: one run per value, named
`<run>@<value>rps` or `<run>@<value>c`.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .load import LoadSpec
from .workload import WorkloadSpec

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
METRICS = {
    "throughput_rps": "higher",
    "throughput_tps": "higher",
    "latency_p50": "lower",
    "latency_p90": "lower",
    "latency_p99": "lower",
    "latency_max": "lower",
    "ttft_p50": "lower",  # time to first token, streaming runs (load.stream: true)
    "ttft_p99": "lower",
    "cpu_ms_per_request": "lower",  # CPU time of the benchmark's processes per completed request
}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_SCENARIO_KEYS = {"name", "description", "model", "engine", "store", "servers", "defaults", "repeat", "runs", "comparisons"}
_RUN_KEYS = {"name", "target", "workload", "load", "streams", "profile"}
_STREAM_KEYS = {"name", "workload", "load"}


@dataclass(frozen=True)
class StreamSpec:
    name: str
    workload: WorkloadSpec
    load: LoadSpec


@dataclass(frozen=True)
class RunSpec:
    name: str
    target_kind: str  # "server" or "engine"
    variant: str  # a key of Scenario.servers
    streams: tuple[StreamSpec, ...]
    profile: bool = False  # sample the serving process with py-spy during the run

    @property
    def target(self) -> str:
        return f"{self.target_kind}:{self.variant}"


@dataclass(frozen=True)
class Target:
    """A ratio between two runs' metric, with the project's goal for it."""

    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Target":
        text = str(text).strip()
        for op in (">=", "<=", ">", "<"):
            if text.startswith(op):
                return cls(op, float(text[len(op):]))
        raise ValueError(f"cannot read target {text!r}; write e.g. '>= 0.95' or '<= 2'")

    def met(self, ratio: float) -> bool:
        return _OPS[self.op](ratio, self.value)

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class Comparison:
    name: str
    numerator: str
    denominator: str
    metric: str
    stream: str | None = None  # a stream's figure instead of the whole run's
    target: Target | None = None
    profile: str | None = None  # run to profile when the target is missed (default: numerator)
    note: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], run_names: set[str]) -> "Comparison":
        keys = {"name", "numerator", "denominator", "metric", "stream", "target", "profile", "note"}
        unknown = set(raw) - keys
        if unknown:
            raise ValueError(f"unknown comparison key(s) {sorted(unknown)}; valid keys are {sorted(keys)}")
        metric = raw.get("metric", "throughput_rps")
        if metric not in METRICS:
            raise ValueError(f"comparison metric {metric!r} is unknown; expected one of {sorted(METRICS)}")
        for side in ("numerator", "denominator"):
            if raw.get(side) not in run_names:
                raise ValueError(
                    f"comparison {raw.get('name')!r}: {side} {raw.get(side)!r} names no run; runs are {sorted(run_names)}"
                )
        return cls(
            name=str(raw.get("name") or f"{raw['numerator']} / {raw['denominator']}"),
            numerator=raw["numerator"],
            denominator=raw["denominator"],
            metric=metric,
            stream=raw.get("stream"),
            target=Target.parse(raw["target"]) if raw.get("target") is not None else None,
            profile=raw.get("profile"),
            note=str(raw.get("note", "")),
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    model: dict[str, Any]
    engine: dict[str, Any]
    store: dict[str, Any]
    servers: dict[str, dict[str, Any]]
    runs: tuple[RunSpec, ...]
    comparisons: tuple[Comparison, ...] = ()
    repeat: int = 1
    source: str = ""

    @property
    def variants_used(self) -> dict[str, set[str]]:
        """Server variants by target kind, e.g. {"server": {"mixed"}, "engine": {"mixed"}}."""
        used: dict[str, set[str]] = {}
        for run in self.runs:
            used.setdefault(run.target_kind, set()).add(run.variant)
        return used

    def app_args(self, variant: str, store_root: str, api_keys_file: str | None = None) -> dict[str, Any]:
        """The Ray Serve application args of one server variant."""
        serving = dict(self.servers[variant])
        if api_keys_file:
            serving["api_keys_file"] = api_keys_file
        return {
            "model": dict(self.model),
            "store": {**self.store, "root": store_root},
            "engine": dict(self.engine),
            "serving": serving,
        }

    def ordered_runs(self) -> list[tuple[int, RunSpec]]:
        """(repeat index, run) in execution order: all runs, then all again in reverse (a b b a),
        so a load that drifts steadily over the session weighs on every run alike."""
        return [(r, run) for r in range(self.repeat) for run in (self.runs if r % 2 == 0 else self.runs[::-1])]

    def with_overrides(self, **changes: Any) -> "Scenario":
        return Scenario(**{**self.__dict__, **changes})


def deep_merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_scenario(path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario file. `path` may also be the name of a shipped scenario."""
    path = resolve_scenario_path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a scenario file holds a mapping (name, servers, runs, ...), got {type(raw).__name__}")
    try:
        return parse_scenario(deep_merge(raw, overrides), source=str(path))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None


def resolve_scenario_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.exists():
        return candidate
    shipped = SCENARIO_DIR / f"{Path(path).stem}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no scenario file {str(path)!r}; give a path or a shipped scenario name ({names})")


def parse_scenario(raw: dict[str, Any], source: str = "") -> Scenario:
    unknown = set(raw) - _SCENARIO_KEYS
    if unknown:
        raise ValueError(f"unknown scenario key(s) {sorted(unknown)}; valid keys are {sorted(_SCENARIO_KEYS)}")
    servers = {str(k): dict(v or {}) for k, v in (raw.get("servers") or {"mixed": {"batching": "mixed"}}).items()}
    defaults = raw.get("defaults") or {}
    unknown = set(defaults) - {"workload", "load"}
    if unknown:
        raise ValueError(f"unknown defaults key(s) {sorted(unknown)}; expected 'workload' and 'load'")
    runs: list[RunSpec] = []
    for entry in raw.get("runs") or []:
        runs.extend(_expand_run(entry, defaults, servers))
    if not runs:
        raise ValueError("the scenario has no runs; list at least one under `runs:`")
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"run names must be unique, repeated: {duplicates}")
    comparisons = tuple(Comparison.from_dict(c, set(names)) for c in raw.get("comparisons") or [])
    repeat = int(raw.get("repeat", 1))
    if repeat < 1:
        raise ValueError(f"repeat={repeat}; expected >= 1")
    return Scenario(
        name=str(raw.get("name") or Path(source).stem or "scenario"),
        description=str(raw.get("description", "")).strip(),
        model=dict(raw.get("model") or {"source": "embedded"}),
        engine=dict(raw.get("engine") or {}),
        store=dict(raw.get("store") or {}),
        servers=servers,
        runs=tuple(runs),
        comparisons=comparisons,
        repeat=repeat,
        source=source,
    )


def _expand_run(entry: dict[str, Any], defaults: dict[str, Any], servers: dict[str, dict]) -> list[RunSpec]:
    unknown = set(entry) - _RUN_KEYS
    if unknown:
        raise ValueError(f"run {entry.get('name')!r}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(_RUN_KEYS)}")
    name = entry.get("name")
    if not name:
        raise ValueError("every run needs a `name`")
    kind, _, variant = str(entry.get("target", "server:" + next(iter(servers)))).partition(":")
    variant = variant or next(iter(servers))
    if kind not in ("server", "engine"):
        raise ValueError(f"run {name!r}: target kind {kind!r} is unknown; write server:<variant> or engine:<variant>")
    if variant not in servers:
        raise ValueError(f"run {name!r}: server variant {variant!r} is not under `servers:` ({sorted(servers)})")
    workload = deep_merge(defaults.get("workload") or {}, entry.get("workload"))
    load = deep_merge(defaults.get("load") or {}, entry.get("load"))
    stream_entries = entry.get("streams") or [{"name": "main"}]
    sweep_key, sweep = _sweep(load, stream_entries)
    out = []
    for value in sweep:
        streams = []
        for stream in stream_entries:
            unknown = set(stream) - _STREAM_KEYS
            if unknown:
                raise ValueError(f"run {name!r}: stream keys {sorted(unknown)} are unknown; valid keys are {sorted(_STREAM_KEYS)}")
            stream_load = deep_merge(load, stream.get("load"))
            if sweep_key is not None and isinstance(stream_load.get(sweep_key), list):
                stream_load[sweep_key] = value
            streams.append(
                StreamSpec(
                    name=str(stream.get("name", "main")),
                    workload=WorkloadSpec.from_dict(deep_merge(workload, stream.get("workload"))),
                    load=LoadSpec.from_dict(stream_load),
                )
            )
        suffix = "" if sweep_key is None else (f"@{value:g}rps" if sweep_key == "rate" else f"@{value}c")
        out.append(RunSpec(name=f"{name}{suffix}", target_kind=kind, variant=variant, streams=tuple(streams),
                           profile=bool(entry.get("profile", False))))
    return out


def _sweep(load: dict[str, Any], streams: list[dict[str, Any]]) -> tuple[str | None, list[Any]]:
    for key in ("rate", "concurrency"):
        values = [load.get(key)] + [deep_merge(load, s.get("load")).get(key) for s in streams]
        lists = [v for v in values if isinstance(v, list)]
        if lists:
            return key, list(lists[0])
    return None, [None]
