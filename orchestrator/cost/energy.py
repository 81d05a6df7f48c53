"""CPU energy from Intel/AMD RAPL counters under /sys/class/powercap, for pricing local CPU attempts.

Each top-level RAPL zone (`intel-rapl:0`, `intel-rapl:1`, ... one per CPU package; AMD's kernels name them
the same) counts microjoules in `energy_uj` and wraps to zero after `max_energy_range_uj` (about an hour at
full load on many CPUs). A meter sums the packages' increments, taking one wrap into account per reading,
and reads itself every SAMPLE_SECONDS from a daemon thread so that no wrap goes unseen. Many kernels let
only root read `energy_uj`; an unreadable counter means no meter (the attempt is then priced by machine time).

RAPL measures the whole package, so an attempt is attributed its share of it: the CPUs it holds over the
machine's cores (at most all of it).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
PACKAGE_ZONE = re.compile(r"^(intel|amd)-rapl:\d+$")
SAMPLE_SECONDS = 30.0
MICRO = 1e-6


def machine_cpus() -> int:
    return os.cpu_count() or 1


def cpu_share(cpus: float | None, cores: int | None = None) -> float:
    """The part of this machine an attempt holding `cpus` CPUs takes (all of it when unknown)."""
    if not cpus or cpus <= 0:
        return 1.0
    return min(1.0, float(cpus) / (cores or machine_cpus()))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class RaplMeter:
    """Joules the CPU packages used since the meter started (None where the host exposes no readable RAPL)."""

    def __init__(self, root: Path = POWERCAP, sample_seconds: float | None = SAMPLE_SECONDS):
        self.zones: dict[Path, int] = {}            # energy_uj file -> its wrap range (uj)
        self.last: dict[Path, int] = {}
        self.total_uj = 0
        self.lock = threading.Lock()
        zones = sorted(p for p in root.glob("*") if PACKAGE_ZONE.match(p.name)) if root.is_dir() else []
        for zone in zones:
            value = _read_int(zone / "energy_uj")
            if value is not None:
                self.zones[zone / "energy_uj"] = _read_int(zone / "max_energy_range_uj") or 0
                self.last[zone / "energy_uj"] = value
        if self.zones and sample_seconds:
            threading.Thread(target=self._sample_every, args=(sample_seconds,), daemon=True, name="rapl-meter").start()

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def _sample_every(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            self.joules()

    def joules(self) -> float | None:
        if not self.zones:
            return None
        with self.lock:
            for path, wrap in self.zones.items():
                value = _read_int(path)
                if value is None:
                    continue
                step = value - self.last[path]
                if step < 0:                   # the counter wrapped once since the last reading
                    step += wrap
                self.total_uj += max(0, step)
                self.last[path] = value
            return self.total_uj * MICRO

    def attributed_joules(self, cpus: float | None) -> float | None:
        """The package energy so far times this attempt's share of the machine (differences of two readings
        are the attempt's energy)."""
        joules = self.joules()
        return None if joules is None else joules * cpu_share(cpus)
