"""The largest legal gRPC message, derived from the configured bounds.

Ray Serve's gRPC proxy accepts messages up to 2 GiB by default, so a 30 MB text crossed the
proxy and reached a replica before any check. The proxy's limit should instead be what the
largest legal message needs: any larger message is refused by gRPC itself
(RESOURCE_EXHAUSTED) before a byte of it reaches a replica. The proxy reads the limit from
$RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (Ray Serve 2.60 has no gRPCOptions field for it; the same
value bounds replies, see `grpc_max_message_bytes`).
"""
from __future__ import annotations

from ..config import AppConfig
from ..engine.types import MAX_CHOICES

GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# gRPC's own default: every client accepts replies this large unless told otherwise, so a
# smaller limit would buy nothing and could refuse large listings.
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ID_BYTES = 128  # one task or tenant id (prompts/ids.py)
MAX_TASK_REF_BYTES = 2 * MAX_ID_BYTES + 1  # "owner/task"
MAX_REQUEST_ID_BYTES = 256
# Room for a prompt's free-text description and every field's framing.
DESCRIPTION_ALLOWANCE_BYTES = 1024 * 1024
_FIELDS_OVERHEAD_BYTES = 256  # tags, lengths and the numeric fields of one message
_LARGEST_ELEMENT_BYTES = 4  # float32 uploads


def generate_request_bytes(config: AppConfig) -> int:
    """The largest legal GenerateRequest: text, task and language ids, request id, params."""
    text = config.promptmux.engine.input_bytes_limit
    return text + 2 * MAX_TASK_REF_BYTES + MAX_REQUEST_ID_BYTES + _FIELDS_OVERHEAD_BYTES


def score_request_bytes(config: AppConfig) -> int:
    """The largest legal ScoreRequest: a GenerateRequest's fields plus MAX_CHOICES candidates."""
    return generate_request_bytes(config) + MAX_CHOICES * (config.promptmux.engine.input_bytes_limit + 8)


def register_request_bytes(config: AppConfig, d_model: int) -> int:
    """The largest legal RegisterPromptRequest: a float32 [max_prompt_length, d_model] tensor."""
    tensor = config.promptmux.store.max_prompt_length * d_model * _LARGEST_ELEMENT_BYTES
    return tensor + DESCRIPTION_ALLOWANCE_BYTES + 2 * MAX_ID_BYTES + _FIELDS_OVERHEAD_BYTES


def grpc_max_message_bytes(config: AppConfig, d_model: int) -> int:
    """What the largest legal request needs (a full GenerateBatch, the largest prompt upload
    or a Score of the most candidates), and never below gRPC's default, which replies (listings) may use."""
    batch = config.serving.max_in_flight_per_tenant * (generate_request_bytes(config) + 16)
    needed = max(batch, register_request_bytes(config, d_model), score_request_bytes(config), GRPC_DEFAULT_MESSAGE_BYTES)
    mib = 1024 * 1024
    return -(-needed // mib) * mib  # whole MiB: easier to read in logs and errors


# A JSON string may spell a byte as a 6-character escape (\u00e9).
_JSON_ESCAPE_FACTOR = 6
_HTTP_FIELDS_ALLOWANCE_BYTES = 64 * 1024  # model, parameters, stop sequences, framing


def http_max_body_bytes(config: AppConfig) -> int:
    """The largest legal HTTP completions body: the most texts one call may carry (one
    tenant's in-flight limit of prompts, or the candidates of a scored one), every byte
    escaped; anything larger is refused with 413 before it is parsed."""
    text = config.promptmux.engine.input_bytes_limit
    texts = max(config.serving.max_in_flight_per_tenant, MAX_CHOICES + 1)
    return texts * (text * _JSON_ESCAPE_FACTOR + 8) + _HTTP_FIELDS_ALLOWANCE_BYTES
