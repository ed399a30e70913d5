"""The batched generation engine: plain PyTorch and transformers, no Ray, no gRPC.

One call of `run_batch` takes requests for any mix of tasks and tenants, builds the whole
batch's encoder input with one fused op (every row: its prompt segments, its tokens, then
padding), runs the encoder once, and decodes rows in a few groups that share a decoding
program (see decoding.py). A bad request fails alone; the rest of the batch still runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from promptmux.kernels.prompt_concat import build_encoder_inputs, pack_segments
from promptmux.kernels.t5_attention_bias import install_t5_bias_attention
from promptmux.prompts.records import PromptMeta
from promptmux.prompts.ids import check_id
from promptmux.prompts.store import PromptStore

from ..config import EngineConfig, PromptmuxConfig
from .static_decoding import (
    PerRowMaxNewTokens,
    PerRowSampler,
    TokenStreamer,
    generation_config,
    group_key,
)
from promptmux.prompts.errors import InvalidRequestError, PromptmuxError, PromptUnusableError, TaskNotFoundError
from ..model.loading import LoadedModel, load_model
from .prompt_bank import Lease, PromptBank, merge_leases
from .prompt_index import PromptIndex
from .types import BatchStats, GenerationRequest, GenerationResult, PreparedRequest, PromptVersionRef
from .sampling import row_seed

TokenCallback = Callable[[int, int], None]
log = logging.getLogger(__name__)


@dataclass
class BatchOutput:
    results: list[GenerationResult | PromptmuxError]  # one per request, in order
    stats: BatchStats


@dataclass
class _Prepared:
    """A prepared request and its position in the caller's list."""

    index: int  # position in the caller's list
    request: GenerationRequest
    token_ids: list[int]
    prompts: list[PromptMeta]

    @classmethod
    def at(cls, index: int, prepared: PreparedRequest) -> "_Prepared":
        return cls(index, prepared.request, list(prepared.token_ids), list(prepared.prompts))


class Engine:
    def __init__(self, loaded: LoadedModel, store: PromptStore, config: EngineConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        if config.attention == "merged-bias":
            install_t5_bias_attention(self.model)  # changes how the shared model attends, not what
        elif config.attention != "model":
            raise InvalidRequestError(
                f"engine.attention={config.attention!r} is unknown; expected 'merged-bias' or 'model'"
            )
        self.tokenizer = loaded.tokenizer
        self.store = store
        self.config = config
        self.device = loaded.input_device
        self.embedding = self.model.get_input_embeddings().weight  # [V, D]
        self.bank = PromptBank(
            capacity_rows=config.prompt_cache_rows,
            page_rows=config.prompt_cache_page_rows,
            d_model=loaded.d_model,
            dtype=self.embedding.dtype,
            device=self.device,
            loader=self._load_prompt,
            host_capacity_rows=config.prompt_host_cache_rows,
        )
        self.index = PromptIndex.from_store(store)
        self.eos_token_id = self.model.config.eos_token_id
        self.pad_token_id = self.model.config.pad_token_id
        # Models pad their vocabulary past the tokenizer's (T5: 32128 vs 32100; random shapes
        # use the 384-id byte tokenizer): such ids have no text.
        self.decodable_ids = len(self.tokenizer)

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
        rescan); they apply to the next batch. Returns how many changes were applied."""
        return self.index.refresh()

    def _load_prompt(self, meta: PromptMeta) -> torch.Tensor:
        """A prompt version's tensor for the bank, checked against what the index promised and
        what this model needs; any failure names the prompt and fails only its requests."""
        name = f"prompt {meta.task!r} of tenant {meta.tenant!r} (version {meta.version})"
        try:
            tensor = self.store.get(meta.tenant, meta.task, meta.version).tensor  # [L, D] on the host
        except TaskNotFoundError:
            raise TaskNotFoundError(
                f"the {name} was deleted after this request was accepted; register the task again or "
                "send the request to a task that exists"
            ) from None
        except PromptmuxError:
            raise
        except Exception as error:  # unreadable or corrupt file
            raise PromptUnusableError(
                f"the {name} cannot be read ({type(error).__name__}: {error}); register it again"
            ) from error
        d_model = self.loaded.d_model
        if tensor.dim() != 2 or tensor.shape[1] != d_model or tensor.shape[0] != meta.length:
            raise PromptUnusableError(
                f"the stored {name} has shape {list(tensor.shape)}, but this model needs "
                f"[{meta.length}, {d_model}] (d_model {d_model}); register a prompt made for this model"
            )
        if not torch.isfinite(tensor).all():
            raise PromptUnusableError(f"the stored {name} has non-finite values; register it again")
        return tensor

    # ------------------------------------------------------------------ requests
    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validate, tokenize and resolve prompt versions once; no model compute.

        Raises the request's PromptmuxError (InvalidRequestError, TaskNotFoundError). CPU
        work proportional to the text: callers on an event loop run it in a thread."""
        return self._prepare(request, self.index)

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
        """Run one batch. Requests already prepared (`prepare`) are not validated or
        tokenized again; plain ones are prepared here against one view of the index."""
        if len(requests) > self.config.max_batch_size:
            raise InvalidRequestError(
                f"batch of {len(requests)} requests exceeds engine.max_batch_size={self.config.max_batch_size}; "
                "split it"
            )
        index = self.index  # one consistent view of prompt versions for the whole batch
        results: list[GenerationResult | PromptmuxError | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, request in enumerate(requests):
            try:
                ready = request if isinstance(request, PreparedRequest) else self._prepare(request, index)
                prepared.append(_Prepared.at(i, ready))
            except Exception as error:  # this request's fault, or a bug it alone hit: it alone fails
                results[i] = _own_failure(error, "preparing")
        # Each request leases its own prompts: a prompt that cannot load (deleted since it was
        # resolved, unreadable, the wrong d_model) or does not fit the bank fails its requests only.
        leases: list[Lease] = []
        runnable: list[_Prepared] = []
        try:
            for p in prepared:
                try:
                    leases.append(self.bank.lease(p.prompts))
                    runnable.append(p)
                except Exception as error:
                    results[p.index] = _own_failure(error, "loading the prompt of")
            stats = BatchStats(len(runnable), 0, 0.0, 0, 0, 0.0, 0.0)
            if runnable:
                stats = self._run(runnable, merge_leases(leases), results, on_token)
        finally:
            for lease in leases:
                self.bank.release(lease)
        return BatchOutput(results=results, stats=stats)  # type: ignore[arg-type]

    def _prepare(self, request: GenerationRequest, prompts: PromptIndex) -> PreparedRequest:
        # Size first, before any work proportional to the text: len() is O(1) and a character
        # is at least one UTF-8 byte, so huge texts are refused without even encoding them.
        limit_bytes = self.config.input_bytes_limit
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
        request.params.validate(self.config.max_new_tokens_limit)
        metas = [prompts.resolve(request.tenant, task) for task in request.prompt_task_ids]
        for meta in metas:
            if meta.d_model != self.loaded.d_model:
                raise PromptUnusableError(
                    f"prompt {meta.task!r} of tenant {meta.tenant!r} (version {meta.version}) was made for "
                    f"d_model {meta.d_model}, but the served model's d_model is {self.loaded.d_model}; "
                    "register a prompt made for this model"
                )
        token_ids = self.tokenizer(request.text)["input_ids"]
        limit = self.config.max_input_tokens
        if len(token_ids) > limit:
            if not request.truncate:
                raise InvalidRequestError(
                    f"the input is {len(token_ids)} tokens long, over the limit of {limit} "
                    "(engine.max_input_tokens); shorten it or set truncate=true"
                )
            token_ids = token_ids[: limit - 1] + [self.eos_token_id]
        self.bank.prefetch(metas)  # at admission: the batch this joins never waits on the disk for it
        return PreparedRequest(request=request, token_ids=tuple(token_ids), prompts=tuple(metas))

    # ------------------------------------------------------------------ compute
    @torch.inference_mode()
    def _run(
        self,
        prepared: list[_Prepared],
        lease: Lease,
        results: list,
        on_token: TokenCallback | None,
    ) -> BatchStats:
        started = time.perf_counter()
        # Host-side metadata: every length is known here, so sizing S needs no device sync.
        rows = [
            [seg for m in p.prompts for seg in lease.segments[(m.tenant, m.task, m.version)]] for p in prepared
        ]
        segments = pack_segments(rows, self.device)
        input_lengths = [len(p.token_ids) for p in prepared]
        total_lengths = [pl + il for pl, il in zip(segments.prompt_lengths, input_lengths)]
        seq_len = max(total_lengths)
        width = max(input_lengths)
        padded = [p.token_ids + [self.pad_token_id] * (width - len(p.token_ids)) for p in prepared]
        input_ids = torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)  # [B, T]
        lengths = torch.tensor(input_lengths, dtype=torch.long).to(self.device, non_blocking=True)  # [B]
        inputs = build_encoder_inputs(
            input_ids, lengths, self.embedding, self.bank.rows, segments, seq_len, backend=self.config.concat_backend
        )
        encoded = self.model.get_encoder()(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask
        ).last_hidden_state  # [B, S, D]
        encode_seconds = time.perf_counter() - started

        groups: dict = {}
        for row, p in enumerate(prepared):
            groups.setdefault(group_key(p.request.params), []).append(row)
        streamed: set[int] = set()  # requests that already received tokens
        tracked = None
        if on_token is not None:
            def tracked(index: int, token: int) -> None:
                streamed.add(index)
                on_token(index, token)
        output_tokens = 0
        for key, group_rows in groups.items():
            args = (prepared, encoded, inputs.attention_mask, total_lengths, results, tracked)
            try:
                output_tokens += self._decode_group(key, group_rows, *args)
            except Exception as error:  # e.g. one row's scores not finite: sampling raises for the group
                output_tokens += self._decode_rows_alone(key, group_rows, args, error, streamed)
        decode_seconds = time.perf_counter() - started - encode_seconds
        tasks = {(m.tenant, m.task) for p in prepared for m in p.prompts}
        return BatchStats(
            batch_size=len(prepared),
            distinct_tasks=len(tasks),
            padding_fraction=1.0 - sum(total_lengths) / (len(prepared) * seq_len),
            input_tokens=sum(input_lengths),
            output_tokens=output_tokens,
            encode_seconds=encode_seconds,
            decode_seconds=decode_seconds,
            cache_hits=lease.hits,
            cache_misses=lease.misses,
            cache_evictions=lease.evictions,
        )

    def _decode_rows_alone(self, key, group_rows, args, error: Exception, streamed: set[int]) -> int:
        """A decoding group failed: decode each of its rows alone, so that a failure belonging
        to one row fails that row only. Rows that already streamed tokens cannot restart
        without repeating them, so they fail with the group's error."""
        prepared, results = args[0], args[4]
        log.warning("a decoding group of %d rows failed (%s: %s); decoding its rows one by one",
                    len(group_rows), type(error).__name__, error)
        produced = 0
        for row in group_rows:
            index = prepared[row].index
            if index in streamed or len(group_rows) == 1:
                results[index] = _own_failure(error, "decoding")
                continue
            try:
                produced += self._decode_group(key, [row], *args)
            except Exception as row_error:
                results[index] = _own_failure(row_error, "decoding")
        return produced

    def detokenize(self, tokens: list[int]) -> str:
        """Text of generated ids. Ids past the tokenizer's vocabulary (a model's padded
        embedding rows, which random or lightly trained weights can emit) decode to nothing."""
        return self.tokenizer.decode([t for t in tokens if t < self.decodable_ids], skip_special_tokens=True)

    def _decode_group(self, key, group_rows, prepared, encoded, mask, total_lengths, results, on_token) -> int:
        params = [prepared[r].request.params for r in group_rows]
        width = max(total_lengths[r] for r in group_rows)  # drop columns that are padding for every row
        select = torch.tensor(group_rows, device=encoded.device)
        hidden = encoded.index_select(0, select)[:, :width]  # [Bg, Sg, D]
        group_mask = mask.index_select(0, select.to(mask.device))[:, :width]  # [Bg, Sg]
        config = generation_config(key, params, self.model.generation_config)
        kwargs: dict = {}
        if key.strategy != "beam":
            limits = torch.tensor([p.max_new_tokens for p in params], device=hidden.device)
            kwargs["stopping_criteria"] = [PerRowMaxNewTokens(limits, start_length=1)]
        if key.strategy == "sample":
            # Each row its own random stream: a seeded row no longer depends on its batch-mates.
            seeds = [row_seed(p) for p in params]
            kwargs["logits_processor"] = [PerRowSampler(params, seeds, hidden.device, start_length=1)]
        if on_token is not None and key.strategy != "beam":
            kwargs["streamer"] = TokenStreamer(
                lambda row, token: on_token(prepared[group_rows[row]].index, token),
                [p.max_new_tokens for p in params],
                self.eos_token_id,
            )
        sequences = self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=group_mask,
            generation_config=config,
            **kwargs,
        )
        generated = sequences[:, 1:].tolist()  # drop the decoder start token; one host sync per group
        produced = 0
        for row, tokens in zip(group_rows, generated):
            item = prepared[row]
            tokens = tokens[: item.request.params.max_new_tokens]
            finish = "length"
            if self.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.eos_token_id) + 1]
                finish = "eos"
            produced += len(tokens)
            results[item.index] = GenerationResult(
                request_id=item.request.request_id,
                text=self.detokenize(tokens),
                token_ids=tokens,
                finish_reason=finish,
                prompt_tokens=sum(m.length for m in item.prompts),
                input_tokens=len(item.token_ids),
                output_tokens=len(tokens),
                prompt_versions=tuple(PromptVersionRef(m.tenant, m.task, m.version) for m in item.prompts),
            )
        if on_token is not None and key.strategy == "beam":
            for row in group_rows:
                for token in results[prepared[row].index].token_ids:
                    on_token(prepared[row].index, token)
        return produced


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"the request text is not valid Unicode ({error.reason} at character {error.start}); send UTF-8 text"
        ) from None


def _own_failure(error: Exception, doing: str) -> PromptmuxError:
    """The error a single request gets for a failure that is its own."""
    if isinstance(error, PromptmuxError):
        return error
    log.exception("%s one request failed; the rest of its batch runs", doing, exc_info=error)
    return PromptmuxError(
        f"internal error {doing} this request ({type(error).__name__}); it failed alone, the replica log "
        "has the traceback"
    )
