"""`promptmux`: the command line.

    promptmux generate --task reverse hello world        offline, on the embedded default
    promptmux generate reverse=hello upper=abc           one mixed batch over several tasks
    promptmux prompts import|export|list|show|rm ...     manage the prompt store
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from typing import Sequence

from .common import DEFAULT_TENANT, add_model_arguments, config_from_args, open_store
from promptmux.prompts.errors import PromptmuxError

# Entry point group of commands other folders add (`promptmux bench`); see pyproject.toml.
COMMANDS_ENTRY_POINTS = "promptmux.commands"

def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except PromptmuxError as error:
        print(f"error ({error.status}): {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptmux", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands")

    generate = commands.add_parser("generate", help="run requests offline as one mixed batch")
    add_model_arguments(generate)
    generate.add_argument("--task", help="task id for every TEXT; without it each TEXT is TASK=TEXT")
    generate.add_argument("--segments", help="comma-separated task ids composed in order (e.g. lang-de,summarize)")
    generate.add_argument("--tenant", default=DEFAULT_TENANT)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--strategy", choices=["greedy", "beam", "sample"], default="greedy")
    generate.add_argument("--num-beams", type=int, default=4)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--truncate", action="store_true", help="cut over-long input instead of rejecting it")
    generate.add_argument("--json", action="store_true", help="print one JSON result per line")
    generate.add_argument("texts", nargs="+", metavar="TEXT")
    generate.set_defaults(handler=run_generate)

    prompts = commands.add_parser("prompts", help="manage the prompt store")
    prompt_commands = prompts.add_subparsers(title="prompt commands")

    imp = prompt_commands.add_parser("import", help="register a prompt from a numpy, PEFT, safetensors or .nemo file")
    add_model_arguments(imp)
    imp.add_argument("--tenant", default=DEFAULT_TENANT)
    imp.add_argument("--task", required=True)
    imp.add_argument("--format", default="auto", choices=["auto", "numpy", "peft", "safetensors", "nemo"])
    imp.add_argument("--nemo-task", help="task name inside a .nemo prompt table that holds several")
    imp.add_argument("--shared", action="store_true", help="let every tenant call this task as TENANT/TASK")
    imp.add_argument("--publish", action="store_true",
                     help="publish the task id in the global namespace: tenants without their own TASK reach it "
                          "by the bare id (an id has one publisher at a time)")
    imp.add_argument("--description", default="")
    imp.add_argument("path")
    imp.set_defaults(handler=run_import)

    exp = prompt_commands.add_parser("export", help="write a stored prompt to a safetensors file")
    add_model_arguments(exp)
    exp.add_argument("--tenant", default=DEFAULT_TENANT)
    exp.add_argument("--version", type=int)
    exp.add_argument("task")
    exp.add_argument("path")
    exp.set_defaults(handler=run_export)

    lst = prompt_commands.add_parser("list", help="list tasks (latest versions)")
    add_model_arguments(lst)
    lst.add_argument("--tenant", help="only this tenant's tasks")
    lst.set_defaults(handler=run_list)

    show = prompt_commands.add_parser("show", help="show a task's versions and metadata")
    add_model_arguments(show)
    show.add_argument("--tenant", default=DEFAULT_TENANT)
    show.add_argument("task")
    show.set_defaults(handler=run_show)

    rm = prompt_commands.add_parser("rm", help="delete a task (every version)")
    add_model_arguments(rm)
    rm.add_argument("--tenant", default=DEFAULT_TENANT)
    rm.add_argument("task")
    rm.set_defaults(handler=run_rm)

    _add_optional_commands(commands, prompt_commands)
    return parser


def _add_optional_commands(commands, prompt_commands) -> None:
    """`prompts train`, and the commands whose modules need optional extras (Ray, gRPC, matplotlib).

    Commands of folders to the right of serving/ (the load-test harness, `promptmux bench`)
    register through the `promptmux.commands` entry point group (pyproject.toml), so serving/
    never imports them."""
    from .prompt_science import add_prompt_science_parsers, visible_tasks
    from .train import add_train_parser

    add_train_parser(prompt_commands).set_defaults(visible_tasks=visible_tasks)
    add_prompt_science_parsers(prompt_commands)
    try:
        from .serve import add_serve_parser
    except ImportError:  # the serve extra is not installed
        pass
    else:
        add_serve_parser(commands)
    for entry in entry_points(group=COMMANDS_ENTRY_POINTS):
        try:
            add_parser = entry.load()
        except ImportError:  # the command's extra is not installed
            continue
        add_parser(commands)


def parse_requests(args: argparse.Namespace):
    from ..engine.types import GenerationParams, GenerationRequest

    params = GenerationParams(
        max_new_tokens=args.max_new_tokens,
        strategy=args.strategy,
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    segments = tuple(s for s in (args.segments or "").split(",") if s)
    requests = []
    for i, text in enumerate(args.texts):
        task = args.task
        if task is None and not segments:
            task, sep, text = text.partition("=")
            if not sep:
                raise SystemExit(
                    f"promptmux generate: {text!r} names no task; pass --task TASK, or write each TEXT as TASK=TEXT"
                )
        requests.append(
            GenerationRequest(
                tenant=args.tenant,
                text=text,
                task=task,
                prompt_segments=segments,
                params=params,
                request_id=str(i),
                truncate=args.truncate,
            )
        )
    return requests


def run_generate(args: argparse.Namespace) -> int:
    from ..demo.prompts import seed_demo_prompts_if_embedded
    from ..engine.core import Engine

    config = config_from_args(args)
    engine = Engine.from_config(config)
    seed_demo_prompts_if_embedded(config.model, engine.store)
    engine.refresh_prompts()
    requests = parse_requests(args)
    results = engine.generate(requests)
    failed = 0
    for request, result in zip(requests, results):
        label = "+".join(request.prompt_task_ids) or "(no prompt)"
        if isinstance(result, PromptmuxError):
            failed += 1
            print(f"[{label}] error ({result.status}): {result}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"task": label, "input": request.text, **_result_dict(result)}))
        else:
            print(f"[{label}] {request.text} -> {result.text}")
    return 1 if failed else 0


def _result_dict(result) -> dict:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "prompt_versions": [f"{v.tenant}/{v.task}@{v.version}" for v in result.prompt_versions],
    }


def run_import(args: argparse.Namespace) -> int:
    from promptmux.prompts.formats import load_prompt, load_task_embedding

    store = open_store(config_from_args(args))
    tensor = load_prompt(args.path, args.format, nemo_task=args.nemo_task)
    extra = {"imported_from": str(args.path)}
    embedding = load_task_embedding(args.path) if args.format in ("auto", "safetensors") else None
    if embedding is not None:  # a promptmux export: keep its task embedding and how it was made
        extra.update(_exported_embedding_info(args.path))
    meta = store.register(
        args.tenant, args.task, tensor, shared=args.shared, publish=args.publish, description=args.description,
        extra=extra, task_embedding=embedding if "task_embedding" in extra else None,
    )
    print(f"registered {meta.tenant}/{meta.task} version {meta.version}: length {meta.length}, "
          f"d_model {meta.d_model}, {meta.dtype}, sha256 {meta.content_hash[:12]}")
    return 0


def _exported_embedding_info(path) -> dict:
    """The task-embedding description a promptmux export recorded, if it has one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("promptmux")
    info = json.loads(recorded).get("extra", {}).get("task_embedding") if recorded else None
    return {"task_embedding": info} if isinstance(info, dict) else {}


def run_export(args: argparse.Namespace) -> int:
    from promptmux.prompts.formats import export_safetensors

    store = open_store(config_from_args(args))
    stored = store.get(args.tenant, args.task, args.version)
    export_safetensors(stored.tensor, args.path, metadata={"promptmux": stored.meta.to_json()},
                       task_embedding=stored.task_embedding)
    print(f"wrote {args.tenant}/{args.task} version {stored.meta.version} to {args.path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..demo.prompts import seed_demo_prompts_if_embedded

    from promptmux.prompts.ids import check_id

    if args.tenant is not None:
        check_id("tenant", args.tenant)
    config = config_from_args(args)
    store = open_store(config)
    seed_demo_prompts_if_embedded(config.model, store)
    metas = store.list(args.tenant)
    if not metas:
        print("no prompts registered")
        return 0
    print(f"{'tenant':<16} {'task':<24} {'ver':>4} {'len':>5} {'dtype':<9} {'scope':<9} sha256")
    for m in metas:
        scope = "published" if m.published else "shared" if m.shared else "private"
        print(f"{m.tenant:<16} {m.task:<24} {m.version:>4} {m.length:>5} {m.dtype:<9} {scope:<9} {m.content_hash[:12]}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    store = open_store(config_from_args(args))
    for meta in store.versions(args.tenant, args.task):
        print(meta.to_json())
    return 0


def run_rm(args: argparse.Namespace) -> int:
    store = open_store(config_from_args(args))
    removed = store.delete(args.tenant, args.task)
    print(f"deleted {args.tenant}/{args.task} ({removed} version(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
