"""`promptmux prompts embed | similar | train-factorized`: task embeddings, retrieval and
factorized prompts on the frozen model.

    promptmux prompts embed --tenant acme reverse --data train.jsonl
    promptmux prompts similar --tenant acme --data new-task.jsonl --top-k 3 [--json]
    promptmux prompts train-factorized --tenant acme --data pairs.jsonl --dev pairs-dev.jsonl

`prompts train --init retrieved|best-of-k` (serving/cli/train.py) ranks sources the same way;
serving/cli/main.py hands it `visible_tasks` so visibility is decided by the store's task table alone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from promptmux.prompts.errors import InvalidRequestError
from promptmux.prompts.task_embedding import TASK_EMBEDDING_EXTRA_KEY, compute_task_embedding

from .common import DEFAULT_TENANT, add_model_arguments, config_from_args


def visible_tasks(store, tenant: str):
    """(name to call it by, metadata) of every task `tenant` can call, exactly as serving resolves them."""
    return _current_tasks(store).callable_by(tenant)


def _current_tasks(store):
    store.tasks.refresh()
    return store.tasks


def add_prompt_science_parsers(prompt_commands) -> None:
    embed = prompt_commands.add_parser(
        "embed", help="compute and store a task's task embedding (SPoT)",
        description="Run the config's short task-embedding recipe on TASK's data and register a new version of "
        "TASK with the same prompt plus the embedding (versions are immutable).")
    add_model_arguments(embed)
    embed.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant that owns TASK")
    embed.add_argument("--data", type=Path, required=True, help='JSONL of the task: {"input", "target"} per line')
    embed.add_argument("task")
    embed.set_defaults(handler=run_embed)

    similar = prompt_commands.add_parser(
        "similar", help="rank the tasks a tenant can use by similarity to a new task's data",
        description="Compute the new task's embedding from --data and rank the stored tasks the tenant can call "
        "(its own and shared ones) that carry a comparable embedding.")
    add_model_arguments(similar)
    similar.add_argument("--tenant", default=DEFAULT_TENANT, help="rank only what this tenant can call")
    similar.add_argument("--data", type=Path, required=True, help="JSONL of the new task")
    similar.add_argument("--top-k", type=int, default=5)
    similar.add_argument("--json", action="store_true", help="print one JSON object")
    similar.set_defaults(handler=run_similar)

    factorized = prompt_commands.add_parser(
        "train-factorized", help="train language and task prompts jointly as [language; task]",
        description="Train one prompt per language and one per task on (language, task) pairs, each row "
        "prompted by [language; task], and register every prompt as its own task. Requests compose "
        "them: GenerateRequest(language=..., task=...) or `generate --segments LANG,TASK`.")
    add_model_arguments(factorized)
    factorized.add_argument("--tenant", default=DEFAULT_TENANT)
    factorized.add_argument("--data", type=Path, required=True,
                            help='JSONL rows {"language", "task", "input", "target"} (make_task_data --pairs)')
    factorized.add_argument("--dev", type=Path, help="dev JSONL of the same shape; unseen pairs are scored too")
    factorized.add_argument("--language-prefix", default="lang-", help="task id prefix of language prompts")
    factorized.add_argument("--task-prefix", default="task-", help="task id prefix of task prompts")
    factorized.add_argument("--length", type=int, default=12, help="rows of each language and each task prompt")
    factorized.add_argument("--steps", type=int, default=600)
    factorized.add_argument("--batch-size", type=int, default=32)
    factorized.add_argument("--lr", type=float, default=0.03, help="Adam learning rate")
    factorized.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                            help="learning rate after warmup: constant, or a cosine decay to 0")
    factorized.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup")
    factorized.add_argument("--init-text", action="append", default=[], metavar="NAME=TEXT",
                            help="start the language or task prompt NAME from TEXT, e.g. upper='upper: ' "
                                 "(repeatable; others start from sampled vocabulary rows)")
    factorized.add_argument("--eval-every", type=int, default=200)
    factorized.add_argument("--seed", type=int, default=0)
    factorized.add_argument("--shared", action="store_true", help="let every tenant use the registered prompts")
    factorized.add_argument("--no-register", action="store_true")
    factorized.add_argument("--no-progress", action="store_true")
    factorized.set_defaults(handler=run_train_factorized)


def _model_and_store(args):
    from promptmux.prompts.store import PromptStore

    from ..model.loading import load_model

    settings = config_from_args(args)
    loaded = load_model(settings.model)
    store = PromptStore(settings.store.root, d_model=loaded.d_model, max_length=settings.store.max_prompt_length)
    return settings, loaded, store


def run_embed(args: argparse.Namespace) -> int:
    from promptmux.prompts.tuning import read_jsonl

    settings, loaded, store = _model_and_store(args)
    stored = store.get(args.tenant, args.task)
    embedding = compute_task_embedding(loaded.model, loaded.tokenizer, read_jsonl(args.data),
                                       settings.task_embedding, model_name=loaded.name)
    meta = stored.meta
    meta = store.register(meta.tenant, meta.task, stored.tensor, shared=meta.shared, description=meta.description,
                          extra={**meta.extra, TASK_EMBEDDING_EXTRA_KEY: embedding.info,
                                 "task_embedding_of_version": meta.version},
                          task_embedding=embedding.tensor)
    print(f"registered {meta.tenant}/{meta.task} version {meta.version}: the same prompt with a task embedding "
          f"({settings.task_embedding.steps} steps on {embedding.info['examples']} examples)")
    return 0


def run_similar(args: argparse.Namespace) -> int:
    from promptmux.prompts.tuning import read_jsonl

    from ..replica.task_similarity import TaskSimilarity

    settings, loaded, store = _model_and_store(args)
    examples = read_jsonl(args.data)[: settings.task_embedding.max_examples]
    answer = TaskSimilarity(loaded, store, settings.task_embedding).similar(
        _current_tasks(store), args.tenant, examples, args.top_k)
    ranking = answer.ranking
    if args.json:
        print(json.dumps({
            "similarity": answer.recipe.similarity, "compared": ranking.compared,
            "without_embedding": [f"{m.tenant}/{m.task}" for m in ranking.without_embedding],
            "tasks": [{"task": m.call_name, "owner": m.meta.tenant, "version": m.meta.version, "score": m.score,
                       "shared": m.meta.shared} for m in ranking.matches],
        }))
        return 0
    print(f"{'rank':>4} {'score':>7}  task (owner, version)")
    for rank, match in enumerate(ranking.matches, start=1):
        print(f"{rank:>4} {match.score:>7.3f}  {match.call_name} ({match.meta.tenant}, v{match.meta.version})")
    print(f"{ranking.compared} task(s) compared ({answer.recipe.similarity} cosine); "
          f"{len(ranking.without_embedding)} without a comparable embedding"
          + (" (add one with `promptmux prompts embed`)" if ranking.without_embedding else ""))
    return 0


def _init_texts(items: list[str], names: set[str]) -> dict[str, str]:
    """`NAME=TEXT` items as a mapping; each NAME must be a language or task of the data."""
    texts = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not text:
            raise InvalidRequestError(f"--init-text {item!r} must be NAME=TEXT, e.g. upper='upper: '")
        if name not in names:
            raise InvalidRequestError(f"--init-text names {name!r}, which is no language or task in the data; "
                                      f"expected one of {', '.join(sorted(names))}")
        texts[name] = text
    return texts


def run_train_factorized(args: argparse.Namespace) -> int:
    from promptmux.prompts.factorized import FactorizedConfig, evaluate_pairs, read_pairs_jsonl, train_factorized

    settings, loaded, store = _model_and_store(args)
    train = read_pairs_jsonl(args.data)
    dev = read_pairs_jsonl(args.dev) if args.dev else {}
    init_texts = _init_texts(args.init_text, {name for pair in train for name in pair})
    config = FactorizedConfig(tenant=args.tenant, language_length=args.length, task_length=args.length,
                              lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup, steps=args.steps,
                              batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed,
                              init_texts=init_texts, progress=not args.no_progress)
    trained_dev = {pair: rows for pair, rows in dev.items() if pair in train}
    result = train_factorized(loaded.model, loaded.tokenizer, train, trained_dev, config,
                              log=None if config.progress else print)
    scores = evaluate_pairs(loaded.model, loaded.tokenizer, result, dev, config) if dev else {}
    for (language, task), score in sorted(scores.items()):
        kind = "trained" if (language, task) in train else "unseen "
        print(f"{kind} {language}+{task}: dev exact match {score:.3f}")
    if args.no_register:
        return 0
    pairs = sorted(train)
    common = {"method": "factorized", "order": "language;task", "model": loaded.name, "steps": config.steps,
              "batch_size": config.batch_size, "lr": config.lr, "schedule": config.schedule,
              "warmup_steps": config.warmup_steps, "init_texts": dict(config.init_texts),
              "trained_pairs": [list(pair) for pair in pairs],
              "dev_exact_match": {f"{lang}+{task}": score for (lang, task), score in scores.items()}}
    for role, prefix, prompts in (("language", args.language_prefix, result.languages),
                                  ("task", args.task_prefix, result.tasks)):
        for name, tensor in sorted(prompts.items()):
            meta = store.register(args.tenant, prefix + name, tensor, shared=args.shared,
                                  description=f"factorized {role} prompt {name!r}",
                                  extra={**common, "role": role, "name": name})
            print(f"registered {meta.tenant}/{meta.task} version {meta.version} ({role} prompt, {meta.length} rows)")
    first_language, first_task = pairs[0]
    print(f"compose: promptmux generate --tenant {args.tenant} --segments "
          f"{args.language_prefix}{first_language},{args.task_prefix}{first_task} TEXT")
    return 0
