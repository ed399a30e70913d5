"""Protobuf <-> the project's plain types. The only place that knows both (`from_pb` / `to_pb`)."""
from __future__ import annotations

import math

import torch

from promptmux.prompts.ids import check_id, parse_task_ref
from promptmux.prompts.records import SUPPORTED_DTYPES, PromptMeta
from promptmux.prompts.synthetic_tasks import Example

from promptmux.prompts.errors import InvalidPromptError, InvalidRequestError, PromptmuxError
from .message_limits import MAX_REQUEST_ID_BYTES
from .proto_build import require_built
from ..engine.types import GenerationParams, GenerationRequest, GenerationResult, TokenLogprob

require_built()  # built at install time (proto_build.py); a check, not a build
from .proto_gen import promptmux_pb2 as pb  # noqa: E402  (built at install time; checked just above)

_STRATEGIES = {pb.STRATEGY_UNSPECIFIED: "greedy", pb.GREEDY: "greedy", pb.BEAM: "beam", pb.SAMPLE: "sample"}
_FINISH = {"eos": pb.EOS, "length": pb.LENGTH, "stop": pb.STOP}
_DEFAULTS = GenerationParams()


_REQUEST_TYPES = {m.name: m.input_type.name for m in pb.DESCRIPTOR.services_by_name["Promptmux"].methods}


def request_message(method: str, raw):
    """The request message of RPC `method` from the bytes the proxy passed through undecoded
    (see serving/rpc/proxy.py); a message already decoded is returned as it is."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return raw
    kind = getattr(pb, _REQUEST_TYPES[method])
    try:
        return kind.FromString(bytes(raw))
    except Exception as error:  # google.protobuf.message.DecodeError, or invalid UTF-8 in a string
        raise InvalidRequestError(
            f"the {method} request is not a valid promptmux.v1.{kind.__name__} message ({error}); send a message "
            "encoded from serving/rpc/promptmux.proto"
        ) from None


# ---------------------------------------------------------------------- generation
def params_from_pb(msg: "pb.GenerationParams") -> GenerationParams:
    for name in ("length_penalty", "temperature", "top_p", "repetition_penalty"):
        if msg.HasField(name) and not math.isfinite(getattr(msg, name)):
            raise InvalidRequestError(f"params.{name} is {getattr(msg, name)}; expected a finite number")
    return GenerationParams(
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else _DEFAULTS.max_new_tokens,
        # An unknown enum value passes through as its number: GenerationParams.validate, the one
        # strategy check, refuses it when the engine prepares the request.
        strategy=_STRATEGIES.get(msg.strategy, msg.strategy),
        num_beams=msg.num_beams if msg.HasField("num_beams") else _DEFAULTS.num_beams,
        length_penalty=msg.length_penalty if msg.HasField("length_penalty") else _DEFAULTS.length_penalty,
        temperature=msg.temperature if msg.HasField("temperature") else _DEFAULTS.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else _DEFAULTS.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        top_k=msg.top_k,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        no_repeat_ngram_size=msg.no_repeat_ngram_size,
        min_new_tokens=msg.min_new_tokens,
        ignore_eos=msg.ignore_eos,
        stop=tuple(msg.stop),
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def request_from_pb(msg: "pb.GenerateRequest", tenant: str) -> GenerationRequest:
    """The engine request for a caller's GenerateRequest; `tenant` comes from the API key."""
    return GenerationRequest(
        tenant=tenant,
        text=msg.text,
        task=msg.task or None,
        prompt_segments=_segments(msg),
        params=params_from_pb(msg.params),
        request_id=msg.request_id,
        truncate=msg.truncate,
    )


def score_request_from_pb(msg: "pb.ScoreRequest", tenant: str) -> GenerationRequest:
    """The engine request (a scored one: `choices`) for a caller's ScoreRequest."""
    if not msg.candidates:
        raise InvalidRequestError("candidates is empty; send the candidate outputs to score (1 to 64 strings)")
    return GenerationRequest(
        tenant=tenant,
        text=msg.text,
        task=msg.task or None,
        prompt_segments=_segments(msg),
        request_id=msg.request_id,
        truncate=msg.truncate,
        choices=tuple(msg.candidates),
    )


def _segments(msg) -> tuple[str, ...]:
    """The prompt segments a GenerateRequest or ScoreRequest names: (language, task) when it
    has a language, else none (the task alone); its task, language and request id checked."""
    if msg.language and not msg.task:
        raise InvalidRequestError(
            f"language={msg.language!r} was given without a task; a language prompt composes with a task "
            "prompt, so set `task` too"
        )
    if msg.task:
        parse_task_ref(msg.task, "task")
    if msg.language:
        parse_task_ref(msg.language, "language")
    if len(msg.request_id) > MAX_REQUEST_ID_BYTES or len(msg.request_id.encode("utf-8")) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequestError(
            f"request_id is {len(msg.request_id.encode('utf-8'))} bytes, over the limit of {MAX_REQUEST_ID_BYTES}; "
            "use a shorter id (it is echoed in the reply)"
        )
    return (msg.language, msg.task) if msg.language else ()


def reply_to_pb(result: GenerationResult) -> "pb.GenerateReply":
    return pb.GenerateReply(
        request_id=result.request_id,
        text=result.text,
        finish_reason=_FINISH.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=result.prompt_tokens,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        prompt_versions=_versions_to_pb(result),
        logprobs=[_logprob_to_pb(entry) for entry in result.logprobs or ()],
    )


def _versions_to_pb(result: GenerationResult) -> list:
    return [pb.PromptVersion(tenant=v.tenant, task=v.task, version=v.version) for v in result.prompt_versions]


def _logprob_to_pb(entry: TokenLogprob) -> "pb.TokenLogprob":
    return pb.TokenLogprob(token_id=entry.token_id, text=entry.text, logprob=entry.logprob,
                           top=[_logprob_to_pb(t) for t in entry.top])


def score_reply_to_pb(result: GenerationResult) -> "pb.ScoreReply":
    scores = result.choice_logprobs
    return pb.ScoreReply(
        request_id=result.request_id,
        best=max(range(len(scores)), key=scores.__getitem__),
        text=result.text,
        logprobs=list(scores),
        prompt_tokens=result.prompt_tokens,
        input_tokens=result.input_tokens,
        prompt_versions=_versions_to_pb(result),
    )


def stream_delta_to_pb(delta: str, output_tokens: int) -> "pb.GenerateStreamReply":
    return pb.GenerateStreamReply(delta=delta, output_tokens=output_tokens)


def stream_final_to_pb(delta: str, result: GenerationResult) -> "pb.GenerateStreamReply":
    return pb.GenerateStreamReply(
        delta=delta, output_tokens=result.output_tokens, done=True, result=reply_to_pb(result)
    )


def batch_item_to_pb(outcome: GenerationResult | PromptmuxError) -> "pb.GenerateBatchItem":
    if isinstance(outcome, PromptmuxError):
        return pb.GenerateBatchItem(error=pb.ItemError(code=outcome.status, message=str(outcome)))
    return pb.GenerateBatchItem(reply=reply_to_pb(outcome))


# ---------------------------------------------------------------------- prompts
def tensor_from_pb(
    msg: "pb.PromptTensor", *, d_model: int | None = None, max_length: int | None = None
) -> torch.Tensor:
    """The [length, d_model] tensor a RegisterPrompt upload describes.

    Everything is checked from the declared dtype and shape (against the served model's
    `d_model` and the store's `max_length` when given) before a byte of data is copied."""
    dtype = SUPPORTED_DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidPromptError(
            f"tensor.dtype={msg.dtype[:64]!r} is not supported; expected one of {sorted(SUPPORTED_DTYPES)}"
        )
    shape = tuple(msg.shape)
    if len(shape) != 2 or 0 in shape:
        raise InvalidPromptError(
            f"tensor.shape={list(shape[:8])} is invalid; expected [length, d_model] with both > 0"
        )
    if d_model is not None and shape[1] != d_model:
        raise InvalidPromptError(
            f"tensor.shape={list(shape)}: prompt d_model is {shape[1]}, but the served model's d_model is "
            f"{d_model}; train or convert the prompt for this model"
        )
    if max_length is not None and shape[0] > max_length:
        raise InvalidPromptError(
            f"tensor.shape={list(shape)}: prompt length {shape[0]} is out of range; expected 1..{max_length} "
            "(store.max_prompt_length)"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = shape[0] * shape[1] * itemsize
    if len(msg.data) != expected:
        raise InvalidPromptError(
            f"tensor.data has {len(msg.data)} bytes, but shape {list(shape)} of {msg.dtype} needs {expected} "
            "(row-major, little-endian)"
        )
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def prompt_owner_from_pb(msg, caller: str) -> str:
    """The tenant a prompt-administration request names (`tenant`, default the caller), checked."""
    return check_id("tenant", msg.tenant or caller)


def prompt_task_from_pb(msg) -> str:
    """The task id of a prompt-administration request: a plain id (never `owner/task`), checked."""
    return check_id("task", msg.task)


def tensor_to_pb(tensor: torch.Tensor) -> "pb.PromptTensor":
    tensor = tensor.detach().cpu().contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    return pb.PromptTensor(dtype=dtype, shape=list(tensor.shape), data=tensor.view(torch.uint8).numpy().tobytes())


def prompt_info_to_pb(meta: PromptMeta) -> "pb.PromptInfo":
    return pb.PromptInfo(
        tenant=meta.tenant,
        task=meta.task,
        version=meta.version,
        content_hash=meta.content_hash,
        d_model=meta.d_model,
        length=meta.length,
        dtype=meta.dtype,
        created_at=meta.created_at,
        shared=meta.shared,
        description=meta.description,
        published=meta.published,
    )


def register_item_to_pb(outcome: PromptMeta | PromptmuxError) -> "pb.RegisterPromptsItem":
    if isinstance(outcome, PromptmuxError):
        return pb.RegisterPromptsItem(error=pb.ItemError(code=outcome.status, message=str(outcome)))
    return pb.RegisterPromptsItem(info=prompt_info_to_pb(outcome))


def task_info_to_pb(name: str, meta: PromptMeta) -> "pb.TaskInfo":
    return pb.TaskInfo(
        task=meta.task,
        owner=meta.tenant,
        version=meta.version,
        length=meta.length,
        shared=meta.shared,
        description=meta.description,
        name=name,
        published=meta.published,
    )


# ---------------------------------------------------------------------- task similarity
DEFAULT_SIMILAR_TOP_K = 5


def similar_request_from_pb(msg: "pb.SimilarTasksRequest") -> tuple[list, int]:
    """(examples, top_k) of a SimilarTasks call."""
    examples = [Example(item.input, item.target) for item in msg.examples]
    return examples, msg.top_k or DEFAULT_SIMILAR_TOP_K


def similar_reply_to_pb(answer) -> "pb.SimilarTasksReply":
    """A serving.task_similarity.SimilarityAnswer as the reply."""
    ranking = answer.ranking
    return pb.SimilarTasksReply(
        tasks=[
            pb.SimilarTask(task=m.call_name, owner=m.meta.tenant, version=m.meta.version, score=m.score,
                           shared=m.meta.shared)
            for m in ranking.matches
        ],
        similarity=answer.recipe.similarity,
        compared=ranking.compared,
        without_embedding=len(ranking.without_embedding),
        embedding_steps=answer.recipe.steps,
        examples_used=answer.examples_used,
    )
