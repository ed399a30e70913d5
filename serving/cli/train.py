"""`promptmux prompts train`: prompt-tune a task on the frozen model and register it.

    promptmux prompts train --data train.jsonl --dev dev.jsonl --tenant acme --task reverse \\
        --init text --init-text "reverse: " --optimizer adam --steps 200 --output runs/reverse

`add_train_parser(subparsers)` adds the `train` subcommand to an argparse subparsers object;
the subcommand's handler is `args.handler(args)`, returning the exit status. Model and store
flags (--config, --model, --dtype, --device, --store) are those of every promptmux command.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from promptmux.prompts.errors import InvalidRequestError

from promptmux.prompts.retrieval import EmbeddingCache, rank_tasks
from promptmux.prompts.store import PromptStore
from promptmux.prompts.task_embedding import TASK_EMBEDDING_EXTRA_KEY, EmbeddingRecipe, compute_task_embedding, shared_init
from promptmux.prompts.transfer import TransferInit, best_of_k, source_prompts, weighted_average
from promptmux.prompts.tuning import (
    DEFAULT_LR,
    INITS,
    OPTIMIZERS,
    RETRIEVAL_INITS,
    SCHEDULES,
    TrainConfig,
    read_jsonl,
    register_prompt,
    tune_prompt,
)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="prompt-tune a task on the frozen model and register the prompt",
        description="Train a soft prompt [L, d_model] on the frozen model (only the prompt learns), "
        "evaluate dev exact match every N steps, keep the best and an early checkpoint (the SPoT task "
        "embedding), and register the best in the prompt store with its training metadata.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help='training JSONL: {"input": ..., "target": ...} per line')
    data.add_argument("--dev", type=Path, help="dev JSONL for exact match and loss; without it the last step is kept")
    target = parser.add_argument_group("prompt")
    target.add_argument("--tenant", required=True, help="tenant that owns the new prompt")
    target.add_argument("--task", required=True, help="task id to register the prompt under")
    target.add_argument("--length", type=int, help="prompt rows L (default 12, or the --init-from prompt's length)")
    target.add_argument("--init", choices=INITS, default="vocab",
                        help="random-uniform (U(-0.5, 0.5)), vocab (sampled token embeddings), text (embeddings "
                        "of --init-text), prompt (a stored prompt, SPoT transfer; see --init-from), retrieved "
                        "(similarity-weighted average of the --top-k stored prompts whose task embeddings are "
                        "closest to this task's) or best-of-k (--probe-steps from each of the --top-k, best on dev)")
    target.add_argument("--top-k", type=int, default=3, help="sources for --init retrieved / best-of-k")
    target.add_argument("--probe-steps", type=int, default=10, help="steps per source for --init best-of-k")
    target.add_argument("--no-task-embedding", action="store_true",
                        help="register without a task embedding (by default one is computed with the config's "
                        "task_embedding recipe, so later tasks can retrieve this one)")
    target.add_argument("--init-text", help="text whose token embeddings start the prompt, e.g. 'reverse: '")
    target.add_argument("--init-from", dest="init_from_task",
                        help="task whose stored prompt starts training: TASK (own, else published) or OWNER/TASK (shared)")
    target.add_argument("--init-from-tenant", help="tenant whose view resolves --init-from (default: --tenant)")
    target.add_argument("--shared", action="store_true", help="let every tenant call the registered prompt as TENANT/TASK")
    target.add_argument("--description", default="", help="free text stored with the prompt")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default="adafactor")
    optim.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR})")
    optim.add_argument("--schedule", choices=SCHEDULES, default="constant")
    optim.add_argument("--warmup-steps", type=int, default=0)
    optim.add_argument("--steps", type=int, default=1000, help="step budget")
    optim.add_argument("--batch-size", type=int, default=32)
    optim.add_argument("--eval-every", type=int, default=100, help="dev evaluation interval in steps")
    optim.add_argument("--early-step", type=int, default=100, help="step of the early (task embedding) checkpoint")
    optim.add_argument("--seed", type=int, default=0)
    from .common import add_model_arguments

    add_model_arguments(parser)  # --config, --model, --dtype, --device, --store, as every command
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--output", type=Path, help="directory for best.safetensors, early.safetensors, history.json and curve.png")
    outputs.add_argument("--no-register", action="store_true", help="train and save, but leave the store unchanged")
    outputs.add_argument("--no-progress", action="store_true", help="log evaluations instead of a progress bar")
    parser.set_defaults(handler=handle_train)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        tenant=args.tenant, task=args.task, prompt_length=args.length, init=args.init, init_text=args.init_text,
        init_from_task=args.init_from_task, init_from_tenant=args.init_from_tenant, top_k=args.top_k,
        probe_steps=args.probe_steps, optimizer=args.optimizer,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.optimizer], schedule=args.schedule,
        warmup_steps=args.warmup_steps, steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
        early_checkpoint_step=args.early_step, seed=args.seed, output_dir=args.output, shared=args.shared,
        description=args.description, progress=not args.no_progress,
    )


def handle_train(args: argparse.Namespace) -> int:
    """Train, save checkpoints, register. Errors propagate as PromptmuxError (the CLI prints them)."""
    from .common import config_from_args
    from ..model.loading import load_model

    settings = config_from_args(args)
    config = train_config_from_args(args)
    config.validate()
    train = read_jsonl(args.data)
    dev = read_jsonl(args.dev) if args.dev else []
    loaded = load_model(settings.model)
    store = PromptStore(settings.store.root, d_model=loaded.d_model, max_length=settings.store.max_prompt_length,
                        quotas=settings.store.quotas())
    embedding = None
    if config.init in RETRIEVAL_INITS or not args.no_task_embedding:
        embedding = compute_task_embedding(loaded.model, loaded.tokenizer, train, settings.task_embedding,
                                           model_name=loaded.name)
    extra, init, init_source = {}, None, "given"
    if config.init in RETRIEVAL_INITS:
        transfer = _transfer_init(args, config, settings.task_embedding, loaded, store, train, dev, embedding)
        init, init_source, extra["transfer"] = transfer.prompt, transfer.init_source, transfer.metadata
        print(f"{config.init} init from " + ", ".join(
            f"{s['tenant']}/{s['task']} ({s['similarity']:.3f})" for s in transfer.metadata["sources"]))
        if "chosen" in transfer.metadata:
            probes = {(s["tenant"], s["task"]): s for s in transfer.metadata["sources"]}
            chosen = transfer.metadata["chosen"]
            probe = probes[(chosen["tenant"], chosen["task"])]
            print(f"best-of-k chose {chosen['tenant']}/{chosen['task']}: dev exact match "
                  f"{probe['probe_exact_match']:.3f}, loss {probe['probe_loss']:.4f} after {args.probe_steps} steps")
    result = tune_prompt(loaded.model, loaded.tokenizer, train, dev, config, store=store, init=init,
                         init_source=init_source, log=None if config.progress else print)
    summary = (f"best dev exact match {result.best.exact_match:.3f} (loss {result.best.loss:.4f}) at step "
               f"{result.best.step}" if result.best else "no dev set: kept the last step")
    if args.output:
        summary += f"; checkpoints in {args.output}"
    if args.no_register:
        print(f"trained {config.tenant}/{config.task}: {summary}; not registered")
        return 0
    if embedding is not None:
        extra[TASK_EMBEDDING_EXTRA_KEY] = embedding.info
    meta = register_prompt(store, result, config, model_name=loaded.name, train_examples=len(train),
                           dev_examples=min(len(dev), config.max_dev_examples or len(dev)), extra=extra,
                           task_embedding=None if embedding is None else embedding.tensor)
    print(f"registered {meta.tenant}/{meta.task} version {meta.version} ({meta.length}x{meta.d_model}, "
          f"sha256 {meta.content_hash[:12]}): {summary}")
    return 0


def _transfer_init(args, config: TrainConfig, recipe: EmbeddingRecipe, loaded, store: PromptStore, train, dev,
                   embedding) -> TransferInit:
    """Rank what the tenant can see (the store's task table, handed in as `visible_tasks`), then
    average or probe the top K."""
    visible = getattr(args, "visible_tasks", None)
    if visible is None:
        raise InvalidRequestError("--init retrieved/best-of-k needs the promptmux CLI (it resolves visible tasks)")
    candidates = [(name, meta) for name, meta in visible(store, config.tenant)
                  if meta.key != (config.tenant, config.task)]
    ranking = rank_tasks(embedding.tensor, candidates, EmbeddingCache(store),
                         init=shared_init(loaded.model, loaded.tokenizer, recipe), recipe=recipe,
                         model_name=loaded.name)
    sources = source_prompts(store, ranking.matches, config.prompt_length)[: config.top_k]
    kept = {id(match) for match, _ in sources}
    last = max(i for i, match in enumerate(ranking.matches) if id(match) in kept)
    skipped = [match for match in ranking.matches[:last] if id(match) not in kept]
    if skipped:
        print(f"skipped, not {sources[0][1].shape[0]} rows like the sources kept: " + ", ".join(
            f"{m.meta.tenant}/{m.meta.task} ({m.meta.length} rows, {m.score:.3f})" for m in skipped))
    if config.init == "retrieved":
        return weighted_average(sources)
    return best_of_k(loaded.model, loaded.tokenizer, train, dev, sources, config, config.probe_steps)
