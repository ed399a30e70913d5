"""Token ids to text deltas for GenerateStream.

Each delta is the new part of the decoded text so far. Decoding the whole prefix each time
(at most max_new_tokens ids) keeps multi-byte characters whole: a byte-level tokenizer
holds back a character until all its bytes have arrived, and joining every delta gives
exactly the text a unary call returns.

With stop sequences, text that a stop sequence could still begin (a suffix that is a prefix
of one) is held back until the next tokens settle it, and text from a stop sequence on is
never sent: the final text is cut before the stop sequence.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

from ..engine.stop_strings import cut_at_stop

log = logging.getLogger(__name__)


class TextDeltas:
    def __init__(self, detokenize: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._detokenize = detokenize  # Engine.detokenize: the text a unary reply gets
        self._stops = tuple(stops)
        self._ids: list[int] = []
        self._emitted = ""

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; returns the text they completed ("" while a character is incomplete)."""
        self._ids.extend(token_ids)
        text = self._detokenize(self._ids).rstrip("\ufffd")
        if self._stops:
            text = _settled(cut_at_stop(text, self._stops), self._stops)
        if not text.startswith(self._emitted):
            return ""  # the decoder rewrote earlier text; the final message settles it
        delta, self._emitted = text[len(self._emitted) :], text
        return delta

    def finish(self, final_text: str) -> str:
        """The last delta, so that every delta joined equals `final_text`."""
        if not final_text.startswith(self._emitted):
            log.warning("streamed text diverged from the final text; the stream's joined deltas will differ")
            return ""
        return final_text[len(self._emitted) :]


def _settled(text: str, stops: Sequence[str]) -> str:
    """`text` without its longest ending that is the start of a stop sequence."""
    held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held]
