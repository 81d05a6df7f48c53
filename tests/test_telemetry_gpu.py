"""GPU samples: nvidia-smi CSV parsing, NVML reading (without a GPU, and with NVML answers stood in), host memory."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from orchestrator.telemetry.gpu import (
    MIB, NVIDIA_SMI_QUERY, GpuSample, LocalGpus, host_memory_ratio, parse_nvidia_smi_csv, throttle_reasons_active,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Real `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` outputs (values from an H100 box,
# a consumer card with unsupported fields, and a GPU that fell off the bus).
H100_TWO_GPUS = """\
0, NVIDIA H100 80GB HBM3, GPU-3b5f2c1a-8d9e-4f01-a2b3-c4d5e6f70819, 38, 0, 1, 81559, 69.85, 345, 0x0000000000000001
1, NVIDIA H100 80GB HBM3, GPU-7c6d5e4f-3a2b-4c1d-9e8f-7a6b5c4d3e2f, 71, 100, 74213, 81559, 688.47, 1980, 0x0000000000000000
"""
CONSUMER_NOT_SUPPORTED = """\
0, NVIDIA GeForce GTX 1080 Ti, GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0, 83, 97, 10871, 11264, [N/A], 1911, [Not Supported]
"""
LOST_GPU = """\
0, NVIDIA A10, GPU-11111111-2222-3333-4444-555555555555, [GPU is lost], [N/A], [N/A], [N/A], [N/A], [N/A], [N/A]
"""


def test_query_is_the_documented_command():
    assert NVIDIA_SMI_QUERY == [
        "nvidia-smi",
        "--query-gpu=index,name,uuid,temperature.gpu,utilization.gpu,memory.used,memory.total,power.draw,"
        "clocks.sm,clocks_throttle_reasons.active",
        "--format=csv,noheader,nounits",
    ]


def test_parse_converts_units():
    first, second = parse_nvidia_smi_csv(H100_TWO_GPUS, host="vast-1", at=1234.5)
    assert first == GpuSample(
        host="vast-1", gpu="0", name="NVIDIA H100 80GB HBM3", uuid="GPU-3b5f2c1a-8d9e-4f01-a2b3-c4d5e6f70819",
        temperature_celsius=38.0, memory_used_bytes=1 * MIB, memory_total_bytes=81559 * MIB,
        utilization_ratio=0.0, power_watts=69.85, energy_joules=None, sm_clock_hz=345e6,
        throttle_reasons=0x1, ecc_errors=None, xid_errors=None, at=1234.5)
    assert second.gpu == "1"
    assert second.utilization_ratio == pytest.approx(1.0)
    assert second.memory_used_bytes == 74213 * 1024 * 1024
    assert second.sm_clock_hz == pytest.approx(1.98e9)
    assert second.throttle_reasons == 0


def test_parse_not_available_fields_are_none():
    (sample,) = parse_nvidia_smi_csv(CONSUMER_NOT_SUPPORTED, host="h", at=0.0)
    assert sample.temperature_celsius == 83.0
    assert sample.power_watts is None
    assert sample.throttle_reasons is None
    assert sample.sm_clock_hz == pytest.approx(1.911e9)
    (lost,) = parse_nvidia_smi_csv(LOST_GPU, host="h", at=0.0)
    assert lost.name == "NVIDIA A10"
    assert all(getattr(lost, f) is None for f in (
        "temperature_celsius", "utilization_ratio", "memory_used_bytes", "memory_total_bytes",
        "power_watts", "sm_clock_hz", "throttle_reasons"))
    assert lost.memory_ratio is None


def test_parse_skips_noise_and_keeps_commas_in_names():
    text = ("\n" "No devices were found\n"
            "2, Vendor GPU, rev 2, GPU-x, 40, 5, 100, 1000, 50.00, 1000, 0x4\n")
    (sample,) = parse_nvidia_smi_csv(text, host="h", at=0.0)
    assert (sample.gpu, sample.name, sample.uuid, sample.throttle_reasons) == ("2", "Vendor GPU, rev 2", "GPU-x", 4)
    assert parse_nvidia_smi_csv("", host="h", at=0.0) == []


def test_parse_output_of_the_vast_simulators_nvidia_smi(tmp_path):
    """The simulator's stand-in nvidia-smi, run for real, prints what parse_nvidia_smi_csv reads."""
    fake = REPO_ROOT / "infra" / "vastsim" / "fake_nvidia_smi.py"
    if not fake.exists():
        pytest.skip("infra/vastsim/fake_nvidia_smi.py is not in this checkout")
    bin_dir = tmp_path / "bin"
    (tmp_path / ".vastsim").mkdir()
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(fake.read_text())
    gpu = {"index": 0, "name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-sim-0", "temperature.gpu": 92,
           "utilization.gpu": 98, "memory.used": 20000, "memory.total": 24564, "power.draw": 430.5,
           "power.limit": 450.0, "clocks.sm": 2520, "clocks_throttle_reasons.active": "0x0000000000000040",
           "driver_version": "550.54.15"}
    (tmp_path / ".vastsim" / "gpu.json").write_text(json.dumps({"gpus": [gpu]}))
    out = subprocess.run([sys.executable, str(bin_dir / "nvidia-smi"), *NVIDIA_SMI_QUERY[1:]],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    (sample,) = parse_nvidia_smi_csv(out, host="sim", at=1.0)
    assert sample.temperature_celsius == 92.0
    assert sample.power_watts == pytest.approx(430.5)
    assert sample.memory_total_bytes == 24564 * MIB
    assert sample.throttle_reasons == 0x40


def test_sample_dict_round_trip_ignores_unknown_keys():
    (sample,) = parse_nvidia_smi_csv(CONSUMER_NOT_SUPPORTED, host="h", at=5.0)
    data = sample.to_dict()
    assert GpuSample.from_dict(data) == sample
    assert GpuSample.from_dict({**data, "gpu": 0, "future_field": 1}) == sample
    assert GpuSample.from_dict({"host": "h", "gpu": "3", "name": "x"}).temperature_celsius is None


def test_throttle_reason_names():
    active = throttle_reasons_active(0x40 | 0x4 | 0x10000)
    assert {name for name, on in active.items() if on} == {"hw_thermal_slowdown", "sw_power_cap", "other"}
    assert not any(throttle_reasons_active(0).values())


def test_local_gpus_without_nvml_is_unavailable_and_reads_nothing():
    gpus = LocalGpus(host="box")
    if gpus.available:
        pytest.skip("this machine has a working NVML")
    assert gpus.reason
    assert gpus.read() == []
    assert gpus.count() == 0
    assert gpus.memory_total_bytes(0) is None


def test_local_gpus_without_pynvml_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)    # import pynvml -> ImportError
    gpus = LocalGpus()
    assert not gpus.available
    assert "pynvml" in gpus.reason
    assert gpus.read() == []


class _NvmlError(Exception):
    pass


def _stand_in_nvml(count: int = 2) -> types.ModuleType:
    """A pynvml stand-in answering like one GPU that supports everything and one that supports little."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM = 1
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nvml.NVML_VOLATILE_ECC = 0
    nvml.shutdowns = 0

    def unsupported(*_args):
        raise _NvmlError("Not Supported")

    def full(index):
        return index == 0

    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: setattr(nvml, "shutdowns", nvml.shutdowns + 1)
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: b"NVIDIA A100-SXM4-40GB" if full(h) else "NVIDIA T4"
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 61 if full(h) else unsupported()
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30, total=40 * 2**30, free=0)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=42, memory=10)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 251_500 if full(h) else unsupported()          # mW
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: 9_876_543 if full(h) else unsupported()  # mJ
    nvml.nvmlDeviceGetClockInfo = lambda h, clock: 1410
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x20 if full(h) else unsupported()
    nvml.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: 3 if full(h) else unsupported()
    return nvml


def test_local_gpus_converts_nvml_units_and_guards_unsupported_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_nvml())
    gpus = LocalGpus(host="box")
    assert gpus.available and gpus.reason == ""
    full, limited = gpus.read()
    assert full == GpuSample(
        host="box", gpu="0", name="NVIDIA A100-SXM4-40GB", uuid="GPU-0", temperature_celsius=61.0,
        memory_used_bytes=2 * 2**30, memory_total_bytes=40 * 2**30, utilization_ratio=0.42, power_watts=251.5,
        energy_joules=9876.543, sm_clock_hz=1.41e9, throttle_reasons=0x20, ecc_errors=3, xid_errors=None,
        at=full.at)
    assert limited.name == "NVIDIA T4"
    assert (limited.temperature_celsius, limited.power_watts, limited.energy_joules,
            limited.throttle_reasons, limited.ecc_errors) == (None, None, None, None, None)
    assert limited.memory_total_bytes == 40 * 2**30
    assert gpus.memory_total_bytes(1) == 40 * 2**30
    gpus.close()
    assert not gpus.available and gpus.read() == []


def test_local_gpus_with_nvml_but_no_gpu(monkeypatch):
    nvml = _stand_in_nvml(count=0)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus = LocalGpus()
    assert not gpus.available
    assert "no GPU" in gpus.reason
    assert nvml.shutdowns == 1


def test_local_gpus_when_the_driver_does_not_load(monkeypatch):
    nvml = _stand_in_nvml()

    def driver_not_loaded():
        raise _NvmlError("Driver Not Loaded")
    nvml.nvmlInit = driver_not_loaded
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus = LocalGpus()
    assert not gpus.available
    assert "Driver Not Loaded" in gpus.reason


def test_host_memory_ratio(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                       "MemAvailable:    4000000 kB\nBuffers:          100 kB\n")
    assert host_memory_ratio(meminfo) == pytest.approx(0.75)
    assert 0.0 <= host_memory_ratio() <= 1.0
