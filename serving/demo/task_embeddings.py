"""Task embeddings for the shipped demo prompts, so that `prompts similar`, the SimilarTasks
call and the retrieval inits of `prompts train` find the demo tasks from the first start.

Each demo prompt file gains a second tensor, `task_embedding`, with the recipe that made it
in its header. The default recipe (prompts/task_embedding.py) runs on fresh strings of the
task. A server whose `task_embedding` config differs from the default cannot compare with
these embeddings, and says so ("without a comparable embedding").

    ./dev python -m promptmux.serving.demo.task_embeddings     # add them to serving/assets
(`build_demo_model` runs the same step after it trains the prompts.)
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from promptmux.prompts.synthetic_tasks import task_examples
from promptmux.prompts.task_embedding import EmbeddingRecipe, compute_task_embedding, shared_init

from ..config import ModelConfig
from ..model.embedded import DEMO_PROMPTS_DIR
from ..model.loading import LoadedModel, load_model

EMBEDDING_TENSOR = "task_embedding"  # the second tensor of a demo prompt file
EMBEDDING_HEADER = "task_embedding"  # its recipe, JSON, in the file's header
EMBEDDING_EXAMPLES = 400
EMBEDDING_DATA_SEED = 700  # the strings differ from the prompts' training and dev strings


def embed_demo_prompts(loaded: LoadedModel, directory: Path = DEMO_PROMPTS_DIR,
                       recipe: EmbeddingRecipe = EmbeddingRecipe(),
                       log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Compute each demo task's embedding and write it into its file. Returns them by task."""
    init = shared_init(loaded.model, loaded.tokenizer, recipe)
    embeddings = {}
    for index, path in enumerate(sorted(Path(directory).glob("*.safetensors"))):
        task = path.stem
        examples = task_examples(task, EMBEDDING_EXAMPLES, seed=EMBEDDING_DATA_SEED + index)
        embedding = compute_task_embedding(loaded.model, loaded.tokenizer, examples, recipe,
                                           model_name=loaded.name, init=init)
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key != EMBEDDING_TENSOR}
        tensors[EMBEDDING_TENSOR] = embedding.tensor.float().contiguous()  # [L, D]
        header[EMBEDDING_HEADER] = json.dumps(embedding.info)
        temp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(temp), metadata=header)
        os.replace(temp, path)  # a reader sees the old file or the new one, never half of one
        embeddings[task] = embedding.tensor
        log(f"demo {task}: task embedding from {len(examples)} strings ({recipe.steps} steps)")
    return embeddings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directory", type=Path, default=DEMO_PROMPTS_DIR, help="the demo prompt files")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    embed_demo_prompts(load_model(ModelConfig(source="embedded")), args.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
