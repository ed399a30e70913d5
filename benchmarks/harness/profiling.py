"""Sample a process with py-spy while a run goes on, and boil the samples down to the
functions that took the time: what the report cites when a target is missed.

py-spy attaches from outside (ptrace), so the profiled process runs unmodified; at 50
samples/s its own cost is a few percent of one core.
"""
from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_RATE = 50


@dataclass
class ProfileSummary:
    label: str  # e.g. "replica promptmux-mixed (pid 1234)"
    samples: int
    # (function, share of samples) where the function is on the stack / is the innermost frame
    inclusive: list[tuple[str, float]] = field(default_factory=list)
    leaf: list[tuple[str, float]] = field(default_factory=list)
    raw_path: str = ""
    error: str = ""


def py_spy() -> str | None:
    """The py-spy executable: on PATH, or beside this interpreter (a virtual environment's bin/,
    which `./dev` does not put on PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def py_spy_available() -> bool:
    return py_spy() is not None


async def profile_pid(pid: int, duration_s: float, out_path: Path, label: str, top: int = 12) -> ProfileSummary:
    """Record `pid` for `duration_s` seconds (all its threads, idle ones left out)."""
    if not py_spy_available():
        return ProfileSummary(label, 0, error="py-spy is not installed (pip install 'promptmux[bench]')")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
        "--rate", str(SAMPLE_RATE), "--format", "raw", "--nonblocking", "--output", str(out_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0 or not out_path.exists():
        return ProfileSummary(label, 0, error=f"py-spy failed ({process.returncode}): {stderr.decode()[-300:]}")
    summary = summarize_collapsed(out_path.read_text(), label, top)
    summary.raw_path = str(out_path)
    return summary


def summarize_collapsed(text: str, label: str, top: int = 12) -> ProfileSummary:
    """Collapsed stacks (`frame;frame;frame count` per line, outermost first) to top functions."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return ProfileSummary(label, 0, error="no samples (the process was idle)")
    share = lambda counter: [(name, count / total) for name, count in counter.most_common() if not _generic(name)][:top]
    return ProfileSummary(label, total, inclusive=share(inclusive), leaf=share(leaf))


# Frames on nearly every stack that say nothing about where time goes: thread and event-loop
# plumbing, decorators and nn.Module's call wrapper.
_GENERIC_FILES = ("/threading.py)", "futures/thread.py)", "utils/_contextlib.py)", "modules/module.py)",
                  "utils/generic.py)", "utils/deprecation.py)", "(asyncio/", "(<string>)")


def _generic(frame: str) -> bool:
    return frame.startswith("<module>") or any(marker in frame for marker in _GENERIC_FILES) or (
        frame.startswith(("Thread.", "_worker ", "_WorkItem."))
    )


def _short(frame: str) -> str:
    """`fn (/long/path/pkg/module.py:123)` -> `fn (pkg/module.py)`: line numbers would split a
    function's samples, and two path parts are enough to tell modules apart."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:])
    return f"{name} ({short})" if short else name


# The host path stage by stage: a sample counts for the first stage (in this order) one of
# whose markers is in one of its frames, as py-spy writes them: `function (path/module.py:line)`.
HOST_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("engine: detokenize, results", ("ModelContext.result (", "ModelContext.detokenize (")),
    ("engine: admission (encoder, cross K/V)", ("StepExecutor._admit (",)),
    ("engine: decoder steps", ("StepExecutor._step (",)),
    ("engine: static path", ("StaticExecutor.run (",)),
    ("engine thread: schedule", ("StepScheduler.schedule (",)),
    ("engine thread: update", ("StepScheduler.update (",)),
    ("prepare: tokenize", ("byte_ids (", "tokenization_")),
    ("prepare: resolve the task", ("TaskNamespace.resolve (",)),
    ("prepare: prompt fetch", ("PromptBank.prefetch (", "HostPromptCache.")),
    ("prepare: rest", ("Preparer.", "Engine.prepare (")),
    ("rpc: deserialise", ("request_message (",)),
    ("rpc: auth", ("KeyRing.authenticate (",)),
    ("rpc: convert", ("request_from_pb (", "reply_to_pb (", "stream_delta_to_pb (", "stream_final_to_pb (")),
    ("rpc: metrics", ("ServingMetrics.", "ray/util/metrics.py")),
    ("rpc: deliver", ("StepScheduler._deliver (", "_settle (")),
    ("rpc: handler", ("PromptmuxServer.", "replica/server.py:", "_Observed.")),
    ("Ray Serve", ("ray/serve/",)),
    ("Ray core", ("(ray/", "_raylet")),
    ("threads in C code (gRPC and Ray polling)", ("Thread.run (",)),
)


def host_stages(text: str) -> dict[str, int]:
    """Samples of a collapsed py-spy recording per host-path stage (plus "other")."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[_stage_of(stack.split(";"))] += int(count)
    return dict(counts)


def _stage_of(frames: list[str]) -> str:
    for stage, markers in HOST_STAGES:
        if any(marker in frame for frame in frames for marker in markers):
            return stage
    return "other"
