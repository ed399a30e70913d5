"""The engine's front: plain PyTorch and transformers, no Ray, no gRPC.

An Engine loads (or receives) the frozen model, builds the ModelContext the executors compute
with, keeps the replica's view of the prompt store current, and prepares requests: each one is
validated, tokenized and resolved to prompt versions exactly once (`prepare`), before any
scheduler sees it. It also runs a whole batch on the static path (`run_batch`), for callers
that have no scheduler: the CLI, demo scoring and the benchmarks.

Who computes: the step executor (engine/step/executor.py) or the static one
(engine/static_decoding.py), built on `Engine.context`; a scheduler drives it with plans
(engine/plan.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from promptmux.prompts.errors import InvalidRequestError, PromptmuxError, PromptUnusableError
from promptmux.prompts.ids import check_id
from promptmux.prompts.store import PromptStore

from ..config import EngineConfig, PromptmuxConfig
from ..model.loading import LoadedModel, load_model
from .context import ModelContext
from .encode import own_failure
from .static_decoding import StaticExecutor
from .types import MAX_CHOICES, BatchStats, GenerationRequest, GenerationResult, PreparedRequest

TokenCallback = Callable[[int, int], None]  # (position in the caller's list, token id)
log = logging.getLogger(__name__)


@dataclass
class BatchOutput:
    results: list[GenerationResult | PromptmuxError]  # one per request, in order
    stats: BatchStats


class Engine:
    def __init__(self, loaded: LoadedModel, store: PromptStore, config: EngineConfig) -> None:
        self.loaded = loaded
        self.store = store
        self.config = config
        self.context = ModelContext.build(loaded, store, config)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.bank = self.context.bank
        self.device = self.context.device
        # The replica's view of the store: every tenant's tasks, kept current from the change
        # log (`refresh_prompts`); requests resolve through its namespace, one lookup, no lock.
        self.tasks = store.tasks
        self.tasks.refresh()
        self._static = StaticExecutor(self.context)
        self._input_bytes_limit = config.input_bytes_limit
        self._token_ids = token_ids_function(loaded.tokenizer)

    @classmethod
    def from_config(cls, config: PromptmuxConfig) -> "Engine":
        loaded = load_model(config.model)
        store = PromptStore(config.store.root, d_model=loaded.d_model, max_length=config.store.max_prompt_length,
                            snapshot_every=config.store.snapshot_every_changes,
                            reconcile_interval_s=config.store.reconcile_interval_s,
                            quotas=config.store.quotas())
        return cls(loaded, store, config.engine)

    # ------------------------------------------------------------------ prompts
    def refresh_prompts(self) -> int:
        """Apply the store's new changes (registrations and deletes since the last call, not a
        rescan); they apply to the next request. Returns how many changes were applied."""
        return self.tasks.refresh()

    # ------------------------------------------------------------------ requests
    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validate, tokenize and resolve prompt versions: the one validation a request gets.

        Raises the request's PromptmuxError (InvalidRequestError, TaskNotFoundError). CPU
        work proportional to the text: callers on an event loop run it in a thread."""
        config = self.config
        # Size first, before any work proportional to the text: len() is O(1) and a character
        # is at least one UTF-8 byte, so huge texts are refused without even encoding them.
        limit_bytes = self._input_bytes_limit
        if not isinstance(request.text, str):
            raise InvalidRequestError(f"the request text is a {type(request.text).__name__}; expected a string")
        if len(request.text) > limit_bytes or len(_utf8(request.text)) > limit_bytes:
            size = len(request.text.encode("utf-8", "surrogatepass"))
            raise InvalidRequestError(
                f"the request text is {size} bytes (UTF-8), over the limit of {limit_bytes} "
                "(engine.max_input_bytes); shorten it, or split it into several requests"
            )
        if not request.text.strip():
            raise InvalidRequestError("the request text is empty; send the input text to run the task on")
        check_id("tenant", request.tenant)
        request.params.validate(config.max_new_tokens_limit)
        namespace = self.tasks.namespace
        metas = tuple(namespace.resolve(request.tenant, task) for task in request.prompt_task_ids)
        d_model = self.context.d_model
        for meta in metas:
            if meta.d_model != d_model:
                raise PromptUnusableError(
                    f"prompt {meta.task!r} of tenant {meta.tenant!r} (version {meta.version}) was made for "
                    f"d_model {meta.d_model}, but the served model's d_model is {d_model}; "
                    "register a prompt made for this model"
                )
        token_ids = self._token_ids(request.text)
        limit = config.max_input_tokens
        if len(token_ids) > limit:
            if not request.truncate:
                raise InvalidRequestError(
                    f"the input is {len(token_ids)} tokens long, over the limit of {limit} "
                    "(engine.max_input_tokens); shorten it or set truncate=true"
                )
            token_ids = token_ids[: limit - 1] + [self.context.eos_token_id]
        choice_ids = self._choice_ids(request.choices)
        self.bank.prefetch(metas)  # at admission: the batch this joins never waits on the disk for it
        return PreparedRequest(request=request, token_ids=tuple(token_ids), prompts=metas, choice_ids=choice_ids)

    def _choice_ids(self, choices: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each candidate of a scored request as the tokens the decoder is teacher-forced with
        (EOS included, as a target), within the same bounds as generated text."""
        if not isinstance(choices, tuple) or not all(isinstance(c, str) for c in choices):
            raise InvalidRequestError(f"choices={choices!r:.80} is invalid; expected a list of candidate strings")
        if len(choices) > MAX_CHOICES:
            raise InvalidRequestError(
                f"choices has {len(choices)} candidates; expected at most {MAX_CHOICES} (split the candidates over "
                "several requests and compare their log-likelihoods)"
            )
        limit_bytes, limit_tokens = self._input_bytes_limit, self.config.max_new_tokens_limit
        ids = []
        for i, choice in enumerate(choices):
            if not choice or len(choice) > limit_bytes or len(_utf8(choice)) > limit_bytes:
                raise InvalidRequestError(
                    f"choices[{i}] is {len(choice.encode('utf-8', 'surrogatepass'))} bytes; expected 1..{limit_bytes} "
                    "UTF-8 bytes (engine.max_input_bytes)"
                )
            tokens = tuple(self.tokenizer(choice)["input_ids"])
            if len(tokens) > limit_tokens:
                raise InvalidRequestError(
                    f"choices[{i}] is {len(tokens)} tokens with its EOS, over the limit of {limit_tokens} "
                    "(engine.max_new_tokens_limit); shorten it"
                )
            ids.append(tokens)
        return tuple(ids)

    def validate(self, request: GenerationRequest) -> None:
        """Cheap checks, no compute: raises InvalidRequestError or TaskNotFoundError."""
        self.prepare(request)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | PromptmuxError]:
        return self.run_batch(requests).results

    def run_batch(
        self,
        requests: Sequence[GenerationRequest | PreparedRequest],
        on_token: TokenCallback | None = None,
    ) -> BatchOutput:
        """Run one batch on the static path, to completion. Requests already prepared are not
        prepared again; a request that fails fails alone (its PromptmuxError in `results`)."""
        if len(requests) > self.config.max_batch_size:
            raise InvalidRequestError(
                f"batch of {len(requests)} requests exceeds engine.max_batch_size={self.config.max_batch_size}; "
                "split it"
            )
        results: list[GenerationResult | PromptmuxError | None] = [None] * len(requests)
        ready: list[tuple[int, PreparedRequest]] = []  # (position as the handle, request)
        for i, request in enumerate(requests):
            try:
                ready.append((i, request if isinstance(request, PreparedRequest) else self.prepare(request)))
            except Exception as error:  # this request's fault, or a bug it alone hit: it alone fails
                results[i] = own_failure(error, "preparing")
        outputs = self._static.run(ready, on_token)
        for i, result in (*outputs.finished.items(), *outputs.errors.items()):
            results[i] = result
        return BatchOutput(results=results, stats=outputs.static)  # type: ignore[arg-type]

    def detokenize(self, tokens: list[int]) -> str:
        return self.context.detokenize(tokens)


def token_ids_function(tokenizer) -> Callable[[str], list[int]]:
    """The tokenizer's ids of a text, as a function. A byte-level vocabulary (ByT5's: UTF-8 bytes
    shifted past 3 special ids, then EOS) is computed directly, about 100x faster than the Python
    tokenizer and the same ids for any text without "<"; a text with "<" may spell a special
    token (`</s>`, `<extra_id_0>`), so it goes to the tokenizer."""
    from transformers import ByT5Tokenizer

    def tokenize(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    if not isinstance(tokenizer, ByT5Tokenizer) or (tokenizer.offset, tokenizer.eos_token_id) != (3, 1):
        return tokenize

    def byte_ids(text: str) -> list[int]:
        if "<" in text:
            return tokenize(text)
        ids = [b + 3 for b in text.encode("utf-8")]
        ids.append(1)
        return ids

    return byte_ids


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"the request text is not valid Unicode ({error.reason} at character {error.start}); send UTF-8 text"
        ) from None
