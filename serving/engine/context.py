"""What an executor computes with: the frozen model and what feeds its encoder, as one object.

The static executor (engine/static_decoding.py) and the step executor (engine/step/executor.py)
receive a ModelContext; neither reaches into the Engine for the model, the embedding, the
prompt bank or the special token ids. The Engine builds it once, at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from promptmux.kernels.t5_attention_bias import install_t5_bias_attention
from promptmux.prompts.errors import InvalidRequestError
from promptmux.prompts.store import PromptStore

from ..config import EngineConfig
from ..model.loading import LoadedModel
from .prompt_bank import PromptBank, load_stored_prompt
from .stop_strings import StopMatcher, cut_at_stop
from .types import FinishReason, GenerationResult, PreparedRequest, PromptVersionRef, TokenLogprob


@dataclass
class ModelContext:
    model: T5ForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    embedding: torch.Tensor  # [V, D] the input embedding the encoder input is gathered from
    bank: PromptBank  # the device prompt cache the fused concat reads prompt rows from
    device: torch.device  # where the encoder input lives
    config: EngineConfig
    d_model: int
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int
    # Models pad their vocabulary past the tokenizer's (T5: 32128 vs 32100; random shapes use
    # the 384-id byte tokenizer): ids from here on have no text.
    decodable_ids: int
    stops: StopMatcher  # the matching tables of stop sequences, built once per string
    # Each token's own text, decoded once (log-probabilities name every token and alternative).
    token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, loaded: LoadedModel, store: PromptStore, config: EngineConfig) -> "ModelContext":
        model = loaded.model
        if config.attention == "merged-bias":
            install_t5_bias_attention(model)  # changes how the shared model attends, not what
        elif config.attention != "model":
            raise InvalidRequestError(
                f"engine.attention={config.attention!r} is unknown; expected 'merged-bias' or 'model'"
            )
        embedding = model.get_input_embeddings().weight  # [V, D]
        d_model = model.config.d_model
        bank = PromptBank(
            capacity_rows=config.prompt_cache_rows,
            page_rows=config.prompt_cache_page_rows,
            d_model=d_model,
            dtype=embedding.dtype,
            device=embedding.device,
            loader=partial(load_stored_prompt, store, d_model),
            host_capacity_rows=config.prompt_host_cache_rows,
        )
        return cls(
            model=model,
            tokenizer=loaded.tokenizer,
            embedding=embedding,
            bank=bank,
            device=embedding.device,
            config=config,
            d_model=d_model,
            pad_token_id=model.config.pad_token_id,
            eos_token_id=model.config.eos_token_id,
            decoder_start_token_id=model.config.decoder_start_token_id,
            decodable_ids=len(loaded.tokenizer),
            stops=StopMatcher(loaded.tokenizer),
        )

    def result(self, prepared: PreparedRequest, tokens: list[int], finish_reason: FinishReason,
               logprobs: list[TokenLogprob] | None = None, choice_logprobs: tuple[float, ...] = (),
               choice: int | None = None) -> GenerationResult:
        """The one place a result is built, whichever path generated `tokens`: a stop
        sequence is cut from the text (the tokens keep it); a scored request's text is its
        chosen candidate as the caller wrote it."""
        if choice is not None:
            text = prepared.request.choices[choice]
        else:
            text = self.detokenize(tokens)
            if finish_reason == "stop":
                text = cut_at_stop(text, prepared.params.stop)
        return GenerationResult(
            request_id=prepared.request.request_id,
            text=text,
            token_ids=tokens,
            finish_reason=finish_reason,
            prompt_tokens=prepared.encoder_tokens - len(prepared.token_ids),
            input_tokens=len(prepared.token_ids),
            output_tokens=len(tokens),
            prompt_versions=tuple(PromptVersionRef(m.tenant, m.task, m.version) for m in prepared.prompts),
            logprobs=None if logprobs is None else tuple(self._with_text(entry) for entry in logprobs),
            choice_logprobs=choice_logprobs,
        )

    def _with_text(self, entry: TokenLogprob) -> TokenLogprob:
        return replace(entry, text=self.token_text(entry.token_id), top=tuple(self._with_text(t) for t in entry.top))

    def token_text(self, token_id: int) -> str:
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = self.detokenize([token_id])
        return text

    def detokenize(self, tokens: list[int]) -> str:
        """Text of generated ids. Ids past the tokenizer's vocabulary (a model's padded
        embedding rows, which random or lightly trained weights can emit) decode to nothing."""
        return self.tokenizer.decode([t for t in tokens if t < self.decodable_ids], skip_special_tokens=True)
