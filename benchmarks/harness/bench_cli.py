"""`promptmux bench`: the load-test harness on the command line.

    promptmux bench run mixed_vs_per_task                 a shipped scenario, on a server it starts
    promptmux bench run my.yaml --address host:9000 --keys-file keys.yaml
    promptmux bench run --tasks 64 --mode open --rate 5,10,20 --duration 20
    promptmux bench suite                                 the standard CPU suite (./dev bench-cpu)
    promptmux bench continuous                            continuous batching vs the static path: the table
    promptmux bench gpu                                   T5-XXL shape, bf16, on CUDA
    promptmux bench scenarios                             list the shipped scenarios
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Any

import yaml

from .scenario import SCENARIO_DIR, Scenario, load_scenario, parse_scenario


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="load-test a server and write a benchmark report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = bench.add_subparsers(title="bench commands")

    run = commands.add_parser("run", help="run one scenario (a YAML file, a shipped name, or flags)")
    run.add_argument("scenario", nargs="?", help="scenario file or shipped scenario name; without it, flags build one")
    _add_target_arguments(run)
    _add_workload_arguments(run)
    _add_load_arguments(run)
    _add_output_arguments(run)
    run.set_defaults(handler=_run_command)

    suite = commands.add_parser("suite", help="the standard CPU suite: every target, about 10 minutes on 2 cores")
    suite.add_argument("--output", type=Path, help="results folder (default benchmarks/results/<date>-<machine>)")
    suite.add_argument("--scale", type=float, default=1.0, help="multiply every run's duration (0.3 for a quick look)")
    suite.add_argument("--only", help="comma-separated scenario names, a subset of the suite")
    suite.add_argument("--no-progress", action="store_true", help="no progress bars")
    suite.set_defaults(handler=_suite_command)

    continuous = commands.add_parser(
        "continuous", help="continuous batching against the static path: fairness, throughput, TTFT, mixing (~12 min)")
    continuous.add_argument("--models", default="random:embedded,random:t5-small",
                            help="comma-separated model sources (default: the embedded and t5-small shapes)")
    continuous.add_argument("--output", type=Path,
                            help="results folder (default benchmarks/results/<date>-<machine>/continuous-batching)")
    continuous.add_argument("--scale", type=float, default=1.0, help="multiply every run's duration (0.5 for a quick look)")
    continuous.add_argument("--no-progress", action="store_true", help="no progress bars")
    continuous.set_defaults(handler=_continuous_command)

    gpu = commands.add_parser("gpu", help="T5-XXL-shaped model in bf16 on CUDA: tokens/s against the bandwidth bound")
    from .gpu_bench import add_gpu_arguments

    add_gpu_arguments(gpu)
    gpu.set_defaults(handler=_gpu_command)

    listing = commands.add_parser("scenarios", help="list the shipped scenario files")
    listing.set_defaults(handler=_list_command)


# ---------------------------------------------------------------------- arguments
def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (default: start one, run, stop it)")
    group.add_argument("--address", help="HOST:PORT of a running server's gRPC endpoint; the harness starts none")
    group.add_argument("--application", default="promptmux", help="Serve application name sent as metadata")
    group.add_argument("--key", action="append", default=[], metavar="TENANT=KEY", help="API key of a workload tenant")
    group.add_argument("--keys-file", type=Path, help="YAML mapping tenant: key (in clear) for a running server")
    group.add_argument("--metrics-url", help="a running server's Prometheus endpoint, e.g. http://host:8080/metrics")
    group.add_argument("--model", help="model source for the harness's server and engine-direct runs")
    group.add_argument("--batching", choices=["mixed", "per_task"], help="server batching mode (flag-built scenarios)")
    group.add_argument("--max-batch-size", type=int, help="server and engine batch limit")
    group.add_argument("--engine-direct", action="store_true",
                       help="flag-built scenarios: also run the workload engine-direct (no gRPC, no Ray)")
    group.add_argument("--cleanup", action="store_true", help="delete the workload's prompts at the end")


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (override every run of a scenario)")
    group.add_argument("--tasks", type=int, help="number of tasks (prompts)")
    group.add_argument("--tenants", type=int, help="number of tenants; tasks are spread over them")
    group.add_argument("--tenant", action="append", metavar="NAME",
                       help="a workload tenant by name (repeatable; instead of --tenants): the tenant your --key is for")
    group.add_argument("--popularity", help="uniform, cycle or zipf:S")
    group.add_argument("--prompt-length", help="prompt rows: N, LOW:HIGH or A,B,C")
    group.add_argument("--input-length", help="input characters: N, LOW:HIGH or A,B,C")
    group.add_argument("--output-length", help="max_new_tokens: N, LOW:HIGH or A,B,C")
    group.add_argument("--seed", type=int)


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load (override every run of a scenario)")
    group.add_argument("--mode", choices=["open", "closed"])
    group.add_argument("--rate", help="open loop: requests/s; a comma list sweeps (flag-built scenarios)")
    group.add_argument("--concurrency", help="closed loop: clients; a comma list sweeps (flag-built scenarios)")
    group.add_argument("--duration", type=float, help="seconds per run, warm-up included")
    group.add_argument("--requests", type=int, help="measured requests per run (after the warm-up)")
    group.add_argument("--warmup", type=float, help="seconds of warm-up, excluded from the figures")
    group.add_argument("--stream", action="store_true", help="use GenerateStream and record time to first token")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output", type=Path, help="results folder (default bench-results/<scenario>-<time>)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    group.add_argument("--profile", action="store_true", help="py-spy the serving processes during every run")
    group.add_argument("--profile-on-miss", action="store_true",
                       help="re-run a run under py-spy when its comparison misses the target")


# ---------------------------------------------------------------------- scenario from flags
def _sweep_values(text: str | None, cast) -> Any:
    if text is None:
        return None
    values = [cast(v) for v in str(text).split(",") if v.strip()]
    return values[0] if len(values) == 1 else values


def workload_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, key in (("tasks", "tasks"), ("tenants", "tenants"), ("popularity", "popularity"),
                      ("prompt_length", "prompt_length"), ("input_length", "input_length"),
                      ("output_length", "output_length"), ("seed", "seed")):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    names = getattr(args, "tenant", None)
    if names:
        if "tenants" in out:
            raise SystemExit("promptmux bench: give --tenants (a count) or --tenant NAME (names), not both")
        out["tenants"] = list(dict.fromkeys(names))
    return out


def load_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.mode:
        out["mode"] = args.mode
    if args.rate is not None:
        out["rate"] = _sweep_values(args.rate, float)
    if args.concurrency is not None:
        out["concurrency"] = _sweep_values(args.concurrency, int)
    if args.duration is not None:
        out["duration_s"] = args.duration
    if args.requests is not None:
        out["requests"] = args.requests
        if args.duration is None:
            out["duration_s"] = None
    if args.warmup is not None:
        out["warmup_s"] = args.warmup
    if args.stream:
        out["stream"] = True
    return out


def scenario_from_flags(args: argparse.Namespace, keys: dict[str, str] | None = None) -> Scenario:
    """A one-run scenario from flags. Against a running server (`--address`) whose keys were
    given, the workload's tenants are those keys' tenants unless `--tenants` says otherwise."""
    load = {"mode": "closed", "concurrency": 64, "duration_s": 20, "warmup_s": 3}
    load.update(load_overrides(args))
    if load.get("mode") == "open" and "rate" not in load:
        raise SystemExit("promptmux bench run: --mode open needs --rate (requests/s, a comma list sweeps)")
    if load.get("mode") == "open":
        load.pop("concurrency", None)
    serving: dict[str, Any] = {"batching": args.batching or "mixed", "torch_threads": 1}
    engine: dict[str, Any] = {}
    if args.max_batch_size:
        serving["max_batch_size"] = args.max_batch_size
        engine["max_batch_size"] = max(args.max_batch_size, 64)
    runs = [{"name": "server", "target": "server:main"}]
    if args.engine_direct:
        runs.append({"name": "engine-direct", "target": "engine:main"})
    raw = {
        "name": "cli",
        "description": "Built from command-line flags.",
        "model": {"source": args.model or "embedded"},
        "engine": engine,
        "servers": {"main": serving},
        "defaults": {"workload": _flag_workload(args, keys or {}), "load": load},
        "runs": runs,
    }
    scenario = parse_scenario(raw, source="command line")
    if args.engine_direct:  # one comparison per swept value: server@X / engine-direct@X
        pairs = [(r.name, "engine-direct" + r.name.removeprefix("server")) for r in scenario.runs
                 if r.target_kind == "server"]
        raw["comparisons"] = [{"name": f"{s} / {e}", "numerator": s, "denominator": e, "metric": "throughput_rps"}
                              for s, e in pairs]
        scenario = parse_scenario(raw, source="command line")
    return scenario


def _flag_workload(args: argparse.Namespace, keys: dict[str, str]) -> dict[str, Any]:
    workload = workload_overrides(args)
    if args.address and keys and "tenants" not in workload:
        workload["tenants"] = list(keys)  # the tenants the caller can authenticate as
    return workload


def check_keys_for_workload(scenario: Scenario, keys: dict[str, str], address: str) -> None:
    """Against a running server every workload tenant needs a key: say which are missing, in one line."""
    tenants = {t for run in scenario.runs for stream in run.streams for t in stream.workload.tenants}
    missing = sorted(t for t in tenants if t not in keys)
    if missing:
        have = f"keys were given for {sorted(keys)}" if keys else "no keys were given"
        raise SystemExit(
            f"promptmux bench run: no API key for workload tenant(s) {missing} of the server at {address} ({have}); "
            f"pass --key TENANT=KEY for each (or --keys-file), or make the workload's tenants those you have keys for"
        )


def apply_overrides(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """Command-line workload and load values replace every stream's own."""
    from .workload import WorkloadSpec

    if args.batching or args.max_batch_size or args.engine_direct:
        raise SystemExit(
            "promptmux bench run: --batching, --max-batch-size and --engine-direct build a scenario from flags; "
            "with a scenario file, set them under its `servers:` and `runs:`"
        )
    workload = workload_overrides(args)
    load = load_overrides(args)
    for key in ("rate", "concurrency"):
        if isinstance(load.get(key), list):
            raise SystemExit(f"promptmux bench run: --{key} sweeps only without a scenario file; put the list in the file")
    runs = []
    for run in scenario.runs:
        streams = []
        for stream in run.streams:
            w = stream.workload
            if workload:
                raw = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
                w = WorkloadSpec.from_dict({**raw, **workload})
            spec = dataclasses.replace(stream.load, **load) if load else stream.load
            streams.append(dataclasses.replace(stream, workload=w, load=spec))
        runs.append(dataclasses.replace(run, streams=tuple(streams)))
    model = dict(scenario.model)
    if args.model:
        model["source"] = args.model
    return scenario.with_overrides(runs=tuple(runs), model=model)


def read_keys(args: argparse.Namespace) -> dict[str, str]:
    keys: dict[str, str] = {}
    if args.keys_file:
        raw = yaml.safe_load(args.keys_file.read_text()) or {}
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise SystemExit(f"{args.keys_file}: expected a mapping of tenant: key (keys in clear, for the client side)")
        keys.update(raw)
    for item in args.key:
        tenant, sep, key = item.partition("=")
        if not sep or not tenant or not key:
            raise SystemExit(f"--key {item!r}: write TENANT=KEY")
        keys[tenant] = key
    return keys


# ---------------------------------------------------------------------- commands
def _run_command(args: argparse.Namespace) -> int:
    from ..machine import machine_info
    from .report import summary_table, write_report, write_summary_json
    from .runner import HarnessOptions, run_scenarios

    keys = read_keys(args)
    try:
        scenario = apply_overrides(load_scenario(args.scenario), args) if args.scenario else scenario_from_flags(args, keys)
    except ValueError as error:  # a workload or load value the scenario rules refuse
        raise SystemExit(f"promptmux bench run: {error}") from None
    if args.address:
        check_keys_for_workload(scenario, keys, args.address)
    output = args.output or Path("bench-results") / f"{scenario.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    options = HarnessOptions(
        output=output,
        address=args.address,
        keys=keys,
        application=args.application,
        metrics_url=args.metrics_url,
        progress=not args.no_progress,
        profile=args.profile,
        profile_on_miss=args.profile_on_miss,
        cleanup=args.cleanup,
    )
    results = run_scenarios([scenario], options)
    machine = machine_info()
    plots = {}
    if not args.no_plots:
        from .plots import plot_scenario

        plots = {r.scenario.name: plot_scenario(r, output / "plots") for r in results}
    target = f"a running server at {args.address}" if args.address else "a server the harness started"
    from .analysis import notes_for

    write_report(results, output, machine, title=f"promptmux benchmark: {scenario.name}",
                 intro=[f"Scenario `{scenario.source}`, against {target}.", ""], plots=plots,
                 notes=notes_for(results))
    write_summary_json(results, output, machine)
    print(summary_table(results))
    print(f"\nreport: {output / 'report.md'}")
    return 0


def _suite_command(args: argparse.Namespace) -> int:
    from .runner import HarnessOptions
    from .suite import SUITE, run_suite

    names = tuple(n.strip() for n in args.only.split(",")) if args.only else SUITE
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"promptmux bench suite: {unknown} are not in the suite ({', '.join(SUITE)})")
    options = HarnessOptions(output=Path("."), progress=not args.no_progress)
    run_suite(output=args.output, names=names, scale=args.scale, options=options, argv=sys.argv[3:])
    return 0


def _continuous_command(args: argparse.Namespace) -> int:
    from .continuous_bench import run_continuous_bench
    from .runner import HarnessOptions

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    options = HarnessOptions(output=Path("."), progress=not args.no_progress)
    run_continuous_bench(models=models, output=args.output, scale=args.scale, options=options, argv=sys.argv[3:])
    return 0


def _gpu_command(args: argparse.Namespace) -> int:
    from .gpu_bench import run_gpu_command

    return run_gpu_command(args)


def _list_command(args: argparse.Namespace) -> int:
    for path in sorted(SCENARIO_DIR.glob("*.yaml")):
        scenario = load_scenario(path)
        first = scenario.description.split(". ")[0].rstrip(".")
        print(f"{path.stem:<20} {len(scenario.runs):>2} runs  {first}")
    return 0
