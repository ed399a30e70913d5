"""The replica's preparer: requests prepared on one thread of its own, in batches, each
failing alone; nothing after close."""
from __future__ import annotations

import asyncio
import threading

import pytest

from promptmux.prompts.errors import InvalidRequestError, UnavailableError
from promptmux.serving.engine.types import GenerationRequest
from promptmux.serving.replica.preparer import Preparer


def test_a_burst_is_prepared_in_one_batch_on_the_preparers_thread_and_failures_stay_alone():
    seen: list[tuple[str, str]] = []
    gate = threading.Event()

    def prepare(request: GenerationRequest) -> str:
        gate.wait(10)  # the first request holds the thread while the burst arrives
        seen.append((request.text, threading.current_thread().name))
        if request.text == "bad":
            raise InvalidRequestError("bad text")
        return request.text.upper()

    async def main():
        preparer = Preparer(prepare)
        first = asyncio.ensure_future(preparer.prepare(GenerationRequest("t", "first")))
        await asyncio.sleep(0.05)
        burst = [asyncio.ensure_future(preparer.prepare(GenerationRequest("t", text))) for text in ("a", "bad", "b")]
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == "FIRST"
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
        assert outcomes[0] == "A" and outcomes[2] == "B" and isinstance(outcomes[1], InvalidRequestError)
        assert {name for _, name in seen} == {"promptmux-prepare"}
        assert preparer.prepared == 4 and preparer.cpu_ns > 0
        preparer.close()
        with pytest.raises(UnavailableError, match="shutting down"):
            await preparer.prepare(GenerationRequest("t", "late"))

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_caller_that_went_away_is_skipped():
    gate = threading.Event()

    def prepare(request: GenerationRequest) -> str:
        gate.wait(10)
        return request.text

    async def main():
        preparer = Preparer(prepare)
        gone = asyncio.ensure_future(preparer.prepare(GenerationRequest("t", "gone")))
        await asyncio.sleep(0.02)
        gone.cancel()
        gate.set()
        assert await preparer.prepare(GenerationRequest("t", "next")) == "next"
        assert gone.cancelled()
        preparer.close()

    asyncio.run(asyncio.wait_for(main(), 20))
