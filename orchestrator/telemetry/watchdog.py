"""The watchdog policy: when to stop training before a machine overheats or freezes, and when to pause.

Pure decisions on GPU samples and host memory; the scheduler polls, acts
(SIGTERM the trainer, which checkpoints), waits for `cooled`, and restarts
from the checkpoint while `restart_allowed`. A file named PAUSE pauses work:
in the run directory it pauses every arm, in an arm's directory (or one of
its seed directories) it pauses that arm.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.telemetry.gpu import GpuSample

PAUSE_FILE_NAME = "PAUSE"
COOL_MARGIN_CELSIUS = 5.0

BreachKind = Literal["gpu_temperature", "gpu_memory", "host_memory"]


class WatchdogConfig(BaseModel):
    """The `watchdog:` section of an arms spec."""
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    gpu_temp_celsius: float = Field(83, gt=0, description="stop an arm when a GPU it uses is at least this hot")
    gpu_memory_ratio: float = Field(0.97, gt=0, le=1, description="stop when GPU memory used / total reaches this")
    host_memory_ratio: float = Field(0.92, gt=0, le=1, description="stop when host memory in use reaches this")
    poll_seconds: float = Field(5, gt=0, description="seconds between checks")
    cooldown_seconds: float = Field(60, ge=0, description="least wait after a breach before restarting")
    max_restarts: int = Field(5, ge=0, description="restarts from the checkpoint allowed per arm run")
    cool_below_celsius: float | None = Field(
        None, gt=0, description="restart only once GPUs are below this (default: gpu_temp_celsius - 5)")


@dataclass(frozen=True)
class Breach:
    kind: BreachKind
    value: float
    threshold: float
    host: str
    gpu: str | None          # None for host memory
    message: str


class Watchdog:
    def __init__(self, cfg: WatchdogConfig | None = None):
        self.cfg = cfg or WatchdogConfig()

    @property
    def cool_below_celsius(self) -> float:
        if self.cfg.cool_below_celsius is not None:
            return self.cfg.cool_below_celsius
        return self.cfg.gpu_temp_celsius - COOL_MARGIN_CELSIUS

    def check(self, samples: list[GpuSample], host_memory_ratio: float | None, host: str = "") -> Breach | None:
        """The first limit crossed, most urgent first: host memory (a frozen machine loses everything),
        then GPU memory, then GPU temperature. None when all is well or the watchdog is disabled."""
        if not self.cfg.enabled:
            return None
        if host_memory_ratio is not None and host_memory_ratio >= self.cfg.host_memory_ratio:
            where = host or (samples[0].host if samples else socket.gethostname())
            return Breach("host_memory", host_memory_ratio, self.cfg.host_memory_ratio, where, None,
                          f"host memory {host_memory_ratio:.0%} in use on {where} "
                          f"(limit {self.cfg.host_memory_ratio:.0%})")
        for sample in samples:
            ratio = sample.memory_ratio
            if ratio is not None and ratio >= self.cfg.gpu_memory_ratio:
                return Breach("gpu_memory", ratio, self.cfg.gpu_memory_ratio, sample.host, sample.gpu,
                              f"GPU {sample.gpu} on {sample.host} memory {ratio:.1%} used "
                              f"(limit {self.cfg.gpu_memory_ratio:.0%})")
        for sample in samples:
            temperature = sample.temperature_celsius
            if temperature is not None and temperature >= self.cfg.gpu_temp_celsius:
                return Breach("gpu_temperature", temperature, self.cfg.gpu_temp_celsius, sample.host, sample.gpu,
                              f"GPU {sample.gpu} on {sample.host} at {temperature:.0f} °C "
                              f"(limit {self.cfg.gpu_temp_celsius:.0f} °C)")
        return None

    def cooled(self, samples: list[GpuSample]) -> bool:
        """True once every GPU with a readable temperature is below the cool-down temperature
        (also when no temperature is readable: there is nothing to wait for)."""
        limit = self.cool_below_celsius
        return all(s.temperature_celsius < limit for s in samples if s.temperature_celsius is not None)

    def restart_allowed(self, restarts_so_far: int) -> bool:
        return restarts_so_far < self.cfg.max_restarts


def pause_requested(run_dir: Path, arm_dir: Path | None = None) -> bool:
    """True when a PAUSE file is in the run directory, or in the arm's directory or a folder between
    them (so `runs/<run>/<arm>/PAUSE` and `runs/<run>/<arm>/seed<k>/PAUSE` both pause that arm run)."""
    run_dir = Path(run_dir)
    if (run_dir / PAUSE_FILE_NAME).exists():
        return True
    if arm_dir is None:
        return False
    folder = Path(arm_dir)
    if folder.resolve().is_relative_to(run_dir.resolve()):
        stop = run_dir.resolve()
        folder = folder.resolve()
        while folder != stop:
            if (folder / PAUSE_FILE_NAME).exists():
                return True
            folder = folder.parent
        return False
    # An arm folder outside the run folder: itself, and its arm folder when given a seed folder.
    if (folder / PAUSE_FILE_NAME).exists():
        return True
    return folder.name.startswith("seed") and (folder.parent / PAUSE_FILE_NAME).exists()
