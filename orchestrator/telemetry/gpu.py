"""GPU health samples: read locally through NVML, or parsed from `nvidia-smi` output of a remote host.

A `GpuSample` is one reading of one GPU. Local GPUs are read with NVML
(`LocalGpus`); on a rented instance a supervisor runs `NVIDIA_SMI_QUERY` and
the backend turns its CSV output into samples with `parse_nvidia_smi_csv`.
Both paths use SI units: bytes, watts, joules, hertz, degrees Celsius and
ratios in 0..1. A field a GPU cannot report is None; nothing here raises
because a GPU, a driver or NVML is missing.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MIB = 1024 * 1024

# The exact command a remote supervisor runs; its output goes to parse_nvidia_smi_csv.
NVIDIA_SMI_FIELDS = (
    "index", "name", "uuid", "temperature.gpu", "utilization.gpu", "memory.used", "memory.total",
    "power.draw", "clocks.sm", "clocks_throttle_reasons.active",
)
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS),
    "--format=csv,noheader,nounits",
]

# NVML clocks-throttle-reason bits (nvmlClocksEventReason*), as label values.
THROTTLE_REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
OTHER_THROTTLE_REASON = "other"  # any bit not listed above (a newer driver's reason)


def throttle_reasons_active(mask: int) -> dict[str, bool]:
    """Every known reason (and "other") mapped to whether its bit is set in `mask`."""
    known = 0
    active = {}
    for bit, name in THROTTLE_REASON_BITS.items():
        active[name] = bool(mask & bit)
        known |= bit
    active[OTHER_THROTTLE_REASON] = bool(mask & ~known)
    return active


# What nvidia-smi prints for a field it cannot read.
_NOT_AVAILABLE = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]",
                  "[insufficient permissions]", "[gpu is lost]", "[gpu requires reset]"}


@dataclass
class GpuSample:
    """One reading of one GPU. Units are in the field names; None = not readable on this GPU."""
    host: str
    gpu: str                                   # index, as a string (the `gpu` label)
    name: str
    uuid: str | None = None
    temperature_celsius: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_ratio: float | None = None     # 0..1
    power_watts: float | None = None
    energy_joules: float | None = None         # cumulative since the driver loaded
    sm_clock_hz: float | None = None
    throttle_reasons: int | None = None        # NVML clocks-throttle-reasons bitmask
    ecc_errors: int | None = None              # volatile uncorrected ECC errors
    xid_errors: int | None = None
    at: float = 0.0                            # unix time of the reading

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuSample":
        """Build a sample from `to_dict()` output; unknown keys are ignored, missing optional ones are None."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["gpu"] = str(values.get("gpu", ""))
        values.setdefault("host", "")
        values.setdefault("name", "")
        return cls(**values)

    @property
    def memory_ratio(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes


# ---- nvidia-smi CSV ----------------------------------------------------------

def _field(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() in _NOT_AVAILABLE else text


def _number(text: str) -> float | None:
    value = _field(text)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _scaled(text: str, factor: float) -> float | None:
    value = _number(text)
    return None if value is None else value * factor


def _mib_to_bytes(text: str) -> int | None:
    value = _number(text)
    return None if value is None else int(value * MIB)


def _bitmask(text: str) -> int | None:
    value = _field(text)
    if value is None:
        return None
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return None


def parse_nvidia_smi_csv(text: str, host: str, at: float) -> list[GpuSample]:
    """Parse the output of NVIDIA_SMI_QUERY (one line per GPU) into samples; malformed lines are skipped."""
    expected = len(NVIDIA_SMI_FIELDS)
    samples = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) < expected:
            continue
        # A GPU name could contain a comma: everything between index and the trailing fields is the name.
        extra = len(parts) - expected
        index = parts[0]
        name = ",".join(parts[1:2 + extra])
        (uuid, temperature, utilization, memory_used, memory_total,
         power, sm_clock, throttle) = parts[2 + extra:]
        if _field(index) is None:
            continue
        samples.append(GpuSample(
            host=host,
            gpu=index.strip(),
            name=_field(name) or "",
            uuid=_field(uuid),
            temperature_celsius=_number(temperature),
            memory_used_bytes=_mib_to_bytes(memory_used),
            memory_total_bytes=_mib_to_bytes(memory_total),
            utilization_ratio=_scaled(utilization, 0.01),
            power_watts=_number(power),
            sm_clock_hz=_scaled(sm_clock, 1e6),
            throttle_reasons=_bitmask(throttle),
            at=at,
        ))
    return samples


# ---- local GPUs through NVML --------------------------------------------------

def _guarded(read: Callable[[], Any]) -> Any:
    """The value of one NVML query, or None when this GPU or driver does not support it."""
    try:
        return read()
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LocalGpus:
    """The GPUs of this machine, read through NVML. Never raises: without NVML `available` is False."""

    def __init__(self, host: str | None = None):
        self.host = host or socket.gethostname()
        self.available = False
        self.reason = ""
        self._nvml: Any = None
        self._lock = threading.Lock()
        try:
            import pynvml
        except ImportError as exc:
            self.reason = f"pynvml (nvidia-ml-py) is not installed: {exc}"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, _NoPermission, ...
            self.reason = f"NVML could not start (no NVIDIA driver?): {_describe_nvml_error(exc)}"
            return
        try:
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:
            self.reason = f"NVML could not count GPUs: {_describe_nvml_error(exc)}"
            _guarded(pynvml.nvmlShutdown)
            return
        if count == 0:
            self.reason = "NVML sees no GPU"
            _guarded(pynvml.nvmlShutdown)
            return
        self._nvml = pynvml
        self.available = True

    def count(self) -> int:
        if not self.available:
            return 0
        return _guarded(self._nvml.nvmlDeviceGetCount) or 0

    def read(self) -> list[GpuSample]:
        """One sample per local GPU; [] without NVML."""
        if not self.available:
            return []
        with self._lock:
            return [sample for index in range(self.count()) if (sample := self._read_one(index)) is not None]

    def memory_total_bytes(self, index: int) -> int | None:
        if not self.available:
            return None
        nvml = self._nvml
        handle = _guarded(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            return None
        memory = _guarded(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        return None if memory is None else int(memory.total)

    def close(self) -> None:
        if self.available:
            _guarded(self._nvml.nvmlShutdown)
            self.available = False
            self.reason = "closed"

    def _read_one(self, index: int) -> GpuSample | None:
        nvml = self._nvml
        handle = _guarded(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            return None
        memory = _guarded(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        utilization = _guarded(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        power_mw = _guarded(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        energy_mj = _guarded(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        sm_clock_mhz = _guarded(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        name = _guarded(lambda: nvml.nvmlDeviceGetName(handle))
        uuid = _guarded(lambda: nvml.nvmlDeviceGetUUID(handle))
        return GpuSample(
            host=self.host,
            gpu=str(index),
            name=_text(name) if name is not None else "",
            uuid=_text(uuid) if uuid is not None else None,
            temperature_celsius=_optional_float(
                _guarded(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            utilization_ratio=None if utilization is None else utilization.gpu / 100.0,
            power_watts=None if power_mw is None else power_mw / 1000.0,
            energy_joules=None if energy_mj is None else energy_mj / 1000.0,
            sm_clock_hz=None if sm_clock_mhz is None else sm_clock_mhz * 1e6,
            throttle_reasons=self._throttle_reasons(handle),
            ecc_errors=_guarded(lambda: int(nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))),
            xid_errors=None,  # NVML reports XIDs only as events, not as a readable counter
            at=time.time(),
        )

    def _throttle_reasons(self, handle: Any) -> int | None:
        nvml = self._nvml
        # Renamed "clocks event reasons" in newer drivers; the old name remains as an alias in most versions.
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            read = getattr(nvml, name, None)
            if read is not None:
                value = _guarded(lambda: read(handle))
                if value is not None:
                    return int(value)
        return None


class SmiGpus:
    """The GPUs of this machine through the `nvidia-smi` command, where NVML cannot be loaded
    (a container without the library, or the Vast simulator's stand-in on PATH)."""

    def __init__(self, host: str | None = None):
        self.host = host or socket.gethostname()
        self.command = shutil.which("nvidia-smi")
        self.available = self.command is not None and bool(self.read())
        self.reason = "" if self.available else "no nvidia-smi on PATH, or it lists no GPU"

    def read(self) -> list[GpuSample]:
        if self.command is None:
            return []
        try:
            out = subprocess.run([self.command, *NVIDIA_SMI_QUERY[1:]], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return []
        return parse_nvidia_smi_csv(out.stdout, self.host, time.time()) if out.returncode == 0 else []

    def memory_total_bytes(self, index: int) -> int | None:
        return next((s.memory_total_bytes for s in self.read() if s.gpu == str(index)), None)


def local_gpus(host: str | None = None) -> LocalGpus | SmiGpus:
    """This machine's GPU reader: NVML, else nvidia-smi, else an NVML reader that says why it is unavailable."""
    nvml = LocalGpus(host)
    if nvml.available:
        return nvml
    smi = SmiGpus(host)
    return smi if smi.available else nvml


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _describe_nvml_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---- an attempt's own machine, read where it runs -------------------------------

class NodeTelemetry:
    """An attempt's health and energy, read on the machine that runs it, for a driver on another machine
    (an attempt on another node of a Ray cluster reports them the way a rented host does): `health_event`
    is the attempt's GPUs and the host's memory as a {"kind": "health"} event, `energy_event` the joules the
    attempt used since this reader started (its GPUs' NVML counters; for a CPU attempt, its share of RAPL)."""

    def __init__(self, gpu_ids: list[str], cpus: float, host: str | None = None):
        self.host = host or socket.gethostname()
        self.gpu_ids = [str(g) for g in gpu_ids]
        self.cpus = cpus
        self.gpus = local_gpus(self.host) if self.gpu_ids else None
        self.rapl = None
        if not self.gpu_ids:
            from orchestrator.cost.energy import RaplMeter
            self.rapl = RaplMeter(sample_seconds=None)      # read by every health_event, so no wrap goes unseen
        self.start_joules = self._joules()

    def _samples(self) -> list[GpuSample]:
        if self.gpus is None or not self.gpus.available:
            return []
        return [sample for sample in self.gpus.read() if sample.gpu in self.gpu_ids]

    def _joules(self) -> float | None:
        if self.rapl is not None:
            return self.rapl.attributed_joules(self.cpus)
        readings = [sample.energy_joules for sample in self._samples()]
        return sum(readings) if readings and None not in readings else None

    def health_event(self) -> dict:
        if self.rapl is not None:
            self.rapl.joules()
        return {"kind": "health", "host": self.host, "samples": [sample.to_dict() for sample in self._samples()],
                "host_memory_ratio": host_memory_ratio()}

    def energy_event(self) -> dict | None:
        end = self._joules()
        if end is None or self.start_joules is None:
            return None
        return {"kind": "energy", "joules": end - self.start_joules}


# ---- host memory ---------------------------------------------------------------

def host_memory_ratio(meminfo: str | Path = "/proc/meminfo") -> float:
    """Fraction of this machine's memory in use: 1 - MemAvailable / MemTotal."""
    values: dict[str, int] = {}
    for line in Path(meminfo).read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            values[key] = int(fields[0])
    total = values["MemTotal"]
    available = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return 1.0 - available / total
