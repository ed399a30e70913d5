"""What machine a benchmark ran on, for the report: CPU, cores, memory, GPU, load, versions."""
from __future__ import annotations

import datetime
import os
import platform
import re
import time
from pathlib import Path
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    cores: int
    memory_gib: float
    gpu: str
    load_average: tuple[float, float, float]
    python: str
    torch: str
    ray: str
    hostname: str

    @property
    def slug(self) -> str:
        """Short folder-name form, e.g. `2core-xeon-8481c` or `h100-80gb-hbm3`."""
        if self.gpu != "none":
            return _slug(self.gpu.split(",")[0])[:40]
        model = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*$|\d+-Core", "", self.cpu_model)
        return f"{self.cores}core-{_slug(model)}"[:40].rstrip("-")

    def describe(self) -> str:
        memory = f"{self.memory_gib:.0f} GiB" if self.memory_gib else "unknown memory"
        gpu = "" if self.gpu == "none" else f", GPU {self.gpu}"
        return (
            f"{self.cpu_model}, {self.cores} cores, {memory}{gpu}; Python {self.python}, torch {self.torch}, "
            f"Ray {self.ray}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_average() -> tuple[float, float, float]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (0.0, 0.0, 0.0)


def busy_elsewhere(interval_s: float = 1.0) -> tuple[float, list[str]]:
    """Cores other processes keep busy right now (sampled over `interval_s`), and the busiest
    of them: on a shared machine, what the benchmark competed with."""
    import psutil

    own = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    processes = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in own]
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval_s)
    usage = []
    for process in processes:
        try:
            command = " ".join(process.info["cmdline"] or []) or process.info["name"] or str(process.pid)
            usage.append((process.cpu_percent(None) / 100, command[:60]))
        except psutil.Error:
            continue
    usage.sort(reverse=True)
    return sum(u for u, _ in usage), [f"`{name}` ({u:.1f})" for u, name in usage[:3] if u >= 0.2]


def machine_info() -> MachineInfo:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0.0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    import torch

    gpu = "none"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(names)
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    return MachineInfo(
        cpu_model=cpu,
        cores=cores,
        memory_gib=memory,
        gpu=gpu,
        load_average=load_average(),
        python=platform.python_version(),
        torch=torch.__version__,
        ray=ray_version,
        hostname=platform.node(),
    )


def results_folder_name(info: MachineInfo, when: datetime.datetime | None = None) -> str:
    when = when or datetime.datetime.now()
    return f"{when:%Y-%m-%d}-{info.slug}"


RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def dated_results_dir(part: str = "micro") -> Path:
    """`benchmarks/results/<date>-<machine>/<part>`: where a benchmark run of today on this
    machine writes its files (result files are data, not code: the package never ships them)."""
    return RESULTS_ROOT / results_folder_name(machine_info()) / part
