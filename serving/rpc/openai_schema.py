"""The OpenAI-compatible HTTP API's bodies <-> the project's plain types (the HTTP edge's
`convert.py`: from_json / to_json, no FastAPI, no engine).

`POST /v1/completions` takes OpenAI's completions body. `model` names the task exactly as
ListTasks names it (`reverse`, `acme/summarize`), or a language prompt and a task joined by
`+` (`lang-upper+task-rotate`: the model sees the language prompt, then the task prompt, as
GenerateRequest.language + task). `prompt` is a string or a list of strings (one batch).

Differences from OpenAI, each on purpose:
- an omitted `temperature` (or 0) decodes greedily: deterministic output, as T5 is used; a
  temperature above 0 samples;
- extensions (OpenAI clients send them through `extra_body`): `top_k`, `repetition_penalty`,
  `no_repeat_ngram_size`, `min_tokens` (Hugging Face's min_new_tokens), `ignore_eos`,
  `truncate`, and `choices`: candidate outputs to score instead of generating (the completion
  is the most likely candidate; `choice_logprobs` gives every candidate's log-likelihood);
- a field the server does not implement (`echo`, `best_of`, `logit_bias`, `suffix`, penalties
  other than the repetition penalty, ...) is a 400 naming the field, never ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from promptmux.prompts.errors import InvalidRequestError, PromptmuxError
from promptmux.prompts.ids import parse_task_ref

from ..engine.types import GenerationParams, GenerationRequest, GenerationResult
from .message_limits import MAX_REQUEST_ID_BYTES

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_N = 16
# HTTP status of each error status (PromptmuxError.status), and OpenAI's error type for it.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504, "CANCELLED": 499, "INTERNAL": 500, "PAYLOAD_TOO_LARGE": 413,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
              503: "service_unavailable", 504: "timeout_error"}
FINISH_REASON = {"eos": "stop", "stop": "stop", "choice": "stop", "length": "length"}

_SUPPORTED = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "stream", "n", "user",
    "stream_options", "top_k", "repetition_penalty", "no_repeat_ngram_size", "min_tokens", "ignore_eos",
    "truncate", "choices",
}


class PayloadTooLargeError(PromptmuxError):
    status = "PAYLOAD_TOO_LARGE"


@dataclass(frozen=True)
class CompletionCall:
    """A parsed completions body: one engine request per (prompt, copy), prompt-major."""

    model: str
    rows: tuple[GenerationRequest, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage counts


def error_body(error: PromptmuxError, param: str | None = None) -> tuple[int, dict]:
    """(HTTP status, OpenAI's error body) of an error."""
    status = HTTP_STATUS.get(error.status, 500)
    return status, {"error": {"message": str(error), "type": ERROR_TYPE.get(status, "server_error"),
                              "param": param if param is not None else getattr(error, "param", None),
                              "code": error.status.lower()}}


def _refuse(param: str, message: str) -> InvalidRequestError:
    error = InvalidRequestError(message)
    error.param = param  # named in the error body's `param`
    return error


def _typed(body: dict, name: str, kind: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:  # JSON true is not a number here
        raise _refuse(name, f"`{name}` must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise _refuse(name, f"`{name}` must be {what}, got {type(value).__name__} {str(value)[:40]!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _refuse(name, f"`{name}` must be a finite number, got {value}")
    return value


def prompt_segments(model: str) -> tuple[str | None, tuple[str, ...]]:
    """(task, prompt segments) of a `model` name: `task`, or `language+task`."""
    parts = model.split("+")
    if len(parts) > 2 or not all(parts):
        raise _refuse("model", f"model={model[:300]!r} is not a task name; expected a task as ListTasks (GET /v1/models) "
                               "names it ('reverse', 'acme/summarize') or 'language+task' ('lang-upper+task-rotate')")
    for part in parts:
        try:
            parse_task_ref(part, "model")
        except InvalidRequestError as error:
            raise _refuse("model", str(error)) from None
    return parts[-1], (tuple(parts) if len(parts) == 2 else ())


def completion_call(body: Any, tenant: str, max_rows: int) -> CompletionCall:
    """The engine requests of a completions body; every refusal names its field. `max_rows`
    bounds prompts x n (the tenant's in-flight limit), checked before any text is tokenized."""
    if not isinstance(body, dict):
        raise _refuse("", "the request body must be a JSON object with `model` and `prompt`")
    unknown = sorted(set(body) - _SUPPORTED)
    if unknown:
        raise _refuse(unknown[0], f"`{unknown[0]}` is not supported by this server (a T5 model behind an "
                                  f"OpenAI-compatible completions API); remove it. Supported: {', '.join(sorted(_SUPPORTED))}")
    model = _typed(body, "model", str, "a task name")
    if model is None:
        raise _refuse("model", "`model` is missing; name the task to run (GET /v1/models lists them)")
    task, segments = prompt_segments(model)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _refuse("prompt", "`prompt` must be a string or a non-empty list of strings (token id lists are not "
                                "supported: send text)")
    n = _typed(body, "n", int, "an integer 1..16", 1)
    if not 1 <= n <= MAX_N:
        raise _refuse("n", f"n={n} is out of range; expected 1..{MAX_N}")
    if len(prompts) * n > max_rows:
        raise _refuse("prompt", f"{len(prompts)} prompts x n={n} make {len(prompts) * n} completions, more than one tenant "
                                f"may have in flight (serving.max_in_flight_per_tenant={max_rows}); split the call")
    user = _typed(body, "user", str, "a string", "")
    if len(user.encode("utf-8", "surrogatepass")) > MAX_REQUEST_ID_BYTES:
        raise _refuse("user", f"`user` is over {MAX_REQUEST_ID_BYTES} bytes; send a shorter end-user id")
    stream = _typed(body, "stream", bool, "true or false", False)
    options = _typed(body, "stream_options", dict, "an object", {})
    if set(options) - {"include_usage"}:
        raise _refuse("stream_options", f"stream_options may hold only include_usage, got {sorted(options)}")
    choices = body.get("choices")
    if choices is not None and (not isinstance(choices, list) or not choices
                                or not all(isinstance(c, str) for c in choices)):
        raise _refuse("choices", "`choices` must be a non-empty list of candidate strings to score")
    params = _params(body, scored=choices is not None)
    if stream and params.logprobs is not None:
        raise _refuse("logprobs", "`logprobs` with `stream` is not supported; ask without stream for log-probabilities")
    if stream and choices is not None:
        raise _refuse("stream", "`choices` scores candidates in one pass: send it without `stream`")
    truncate = _typed(body, "truncate", bool, "true or false", False)
    rows = []
    for text in prompts:
        for copy in range(n):
            seeded = params if params.seed is None or copy == 0 else _reseed(params, copy)
            rows.append(GenerationRequest(tenant=tenant, text=text, task=task, prompt_segments=segments, params=seeded,
                                          request_id=user, truncate=truncate,
                                          choices=tuple(choices) if choices is not None else ()))
    return CompletionCall(model=model, rows=tuple(rows), stream=stream,
                          include_usage=bool(options.get("include_usage", False)))


def _reseed(params: GenerationParams, copy: int) -> GenerationParams:
    """The n copies of a seeded sampling request draw different completions, reproducibly."""
    return replace(params, seed=(params.seed + copy) % 2**64)


def _params(body: dict, scored: bool) -> GenerationParams:
    number = (int, float)
    temperature = _typed(body, "temperature", number, "a number", 0)
    if temperature < 0:
        raise _refuse("temperature", f"temperature={temperature} is invalid; expected 0 (greedy) or a value in [1e-4, 1e4]")
    sampling = temperature > 0
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _refuse("stop", "`stop` must be a string or a list of up to 4 strings")
    logprobs = _typed(body, "logprobs", int, "an integer 0..20", None)
    if scored and body.get("max_tokens") is not None:
        raise _refuse("max_tokens", "`choices` scores the given candidates: `max_tokens` does not apply, remove it")
    try:
        params = GenerationParams(
            max_new_tokens=_typed(body, "max_tokens", int, "an integer", DEFAULT_MAX_TOKENS),
            strategy="sample" if sampling else "greedy",
            temperature=float(temperature) if sampling else 1.0,
            top_p=float(_typed(body, "top_p", number, "a number in (0, 1]", 1.0)),
            seed=_typed(body, "seed", int, "an integer", None),
            top_k=_typed(body, "top_k", int, "an integer (0 or -1: off)", 0),
            repetition_penalty=float(_typed(body, "repetition_penalty", number, "a number", 1.0)),
            no_repeat_ngram_size=_typed(body, "no_repeat_ngram_size", int, "an integer", 0),
            min_new_tokens=_typed(body, "min_tokens", int, "an integer", 0),
            ignore_eos=_typed(body, "ignore_eos", bool, "true or false", False),
            stop=tuple(stops),
            logprobs=logprobs,
        )
    except InvalidRequestError as error:  # a GenerationParams type check
        raise _refuse("", str(error)) from None
    return replace(params, top_k=0) if params.top_k == -1 else params  # -1: vLLM's spelling of "off"


# ---------------------------------------------------------------------- replies
def usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.input_tokens for r in results)
    completion = sum(r.output_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_choice(index: int, result: GenerationResult, eos_token_id: int) -> dict:
    choice: dict[str, Any] = {"text": result.text, "index": index, "logprobs": None,
                              "finish_reason": FINISH_REASON.get(result.finish_reason, "stop")}
    if result.logprobs is not None:
        entries = list(result.logprobs)
        if entries and result.finish_reason == "eos" and entries[-1].token_id == eos_token_id:
            entries = entries[:-1]  # the end-of-sequence token has no text
        offsets, at = [], 0
        for entry in entries:
            offsets.append(at)
            at += len(entry.text)
        choice["logprobs"] = {
            "tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.text: t.logprob for t in e.top} for e in entries] if entries and entries[0].top
            else None,
            "text_offset": offsets,
        }
    if result.choice_logprobs:
        choice["choice_logprobs"] = list(result.choice_logprobs)
    return choice


def completion_body(call_id: str, created: int, model: str, results: list[GenerationResult], eos: int) -> dict:
    return {"id": call_id, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(i, r, eos) for i, r in enumerate(results)], "usage": usage(results)}


def stream_chunk(call_id: str, created: int, model: str, index: int, text: str, finish: str | None) -> dict:
    return {"id": call_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(call_id: str, created: int, model: str, results: list[GenerationResult]) -> dict:
    return {"id": call_id, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": usage(results)}


def model_entry(name: str, meta) -> dict:
    """A task as an OpenAI model object (`id` is the name to send as `model`)."""
    return {"id": name, "object": "model", "created": int(meta.created_at), "owned_by": meta.tenant,
            "version": meta.version, "prompt_rows": meta.length, "shared": meta.shared,
            "published": meta.published, "description": meta.description}
