"""Watchdog policy: thresholds, cool-down, restart budget, PAUSE files, and the spec section."""

import pydantic
import pytest

from orchestrator.telemetry.gpu import GpuSample, parse_nvidia_smi_csv
from orchestrator.telemetry.watchdog import Breach, Watchdog, WatchdogConfig, pause_requested

GIB = 2**30


def gpu(index="0", temperature=60.0, used_gib=10.0, total_gib=24.0, host="box") -> GpuSample:
    return GpuSample(host=host, gpu=index, name="NVIDIA RTX A5000", temperature_celsius=temperature,
                     memory_used_bytes=None if used_gib is None else int(used_gib * GIB),
                     memory_total_bytes=None if total_gib is None else int(total_gib * GIB), at=1.0)


def test_defaults_match_the_design():
    cfg = WatchdogConfig()
    assert (cfg.enabled, cfg.gpu_temp_celsius, cfg.gpu_memory_ratio, cfg.host_memory_ratio, cfg.poll_seconds,
            cfg.cooldown_seconds, cfg.max_restarts, cfg.cool_below_celsius) == (True, 83, 0.97, 0.92, 5, 60, 5, None)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(pydantic.ValidationError, match="gpu_temp"):
        WatchdogConfig.model_validate({"gpu_temp": 80})
    with pytest.raises(pydantic.ValidationError):
        WatchdogConfig(gpu_memory_ratio=1.5)
    with pytest.raises(pydantic.ValidationError):
        WatchdogConfig(max_restarts=-1)
    assert WatchdogConfig.model_validate({"gpu_temp_celsius": 80, "cool_below_celsius": 70}).cool_below_celsius == 70


def test_all_well_is_no_breach():
    assert Watchdog().check([gpu(), gpu("1", temperature=82.9)], host_memory_ratio=0.5) is None
    assert Watchdog().check([], host_memory_ratio=None) is None


def test_gpu_temperature_at_the_threshold_is_a_breach():
    breach = Watchdog().check([gpu("0"), gpu("1", temperature=83.0)], host_memory_ratio=0.3)
    assert breach == Breach("gpu_temperature", 83.0, 83, "box", "1", breach.message)
    assert "GPU 1" in breach.message and "83" in breach.message


def test_gpu_memory_breach():
    breach = Watchdog().check([gpu(used_gib=23.5)], host_memory_ratio=0.3)
    assert (breach.kind, breach.gpu, breach.threshold) == ("gpu_memory", "0", 0.97)
    assert breach.value == pytest.approx(23.5 / 24)


def test_host_memory_breach_comes_first():
    breach = Watchdog().check([gpu(temperature=95, used_gib=24)], host_memory_ratio=0.95, host="box")
    assert (breach.kind, breach.host, breach.gpu, breach.value) == ("host_memory", "box", None, 0.95)
    assert "95%" in breach.message


def test_unreadable_fields_never_breach():
    samples = parse_nvidia_smi_csv("0, NVIDIA A10, GPU-1, [N/A], [N/A], [N/A], [N/A], [N/A], [N/A], [N/A]\n",
                                   host="h", at=0.0)
    assert Watchdog().check(samples, host_memory_ratio=None) is None
    assert Watchdog().check([gpu(used_gib=1, total_gib=0)], host_memory_ratio=None) is None


def test_disabled_watchdog_never_breaches():
    watchdog = Watchdog(WatchdogConfig(enabled=False))
    assert watchdog.check([gpu(temperature=120, used_gib=24)], host_memory_ratio=1.0) is None


def test_custom_thresholds():
    watchdog = Watchdog(WatchdogConfig(gpu_temp_celsius=70, gpu_memory_ratio=0.5, host_memory_ratio=0.6))
    assert watchdog.check([gpu(temperature=71)], 0.1).kind == "gpu_temperature"
    assert watchdog.check([gpu(used_gib=12.5)], 0.1).kind == "gpu_memory"
    assert watchdog.check([gpu()], 0.61).kind == "host_memory"


def test_cool_down_waits_five_degrees_below_the_limit_by_default():
    watchdog = Watchdog()
    assert watchdog.cool_below_celsius == 78
    assert not watchdog.cooled([gpu(temperature=80)])
    assert not watchdog.cooled([gpu("0", temperature=60), gpu("1", temperature=78)])
    assert watchdog.cooled([gpu("0", temperature=60), gpu("1", temperature=77.9)])
    assert watchdog.cooled([gpu(temperature=None)])
    assert watchdog.cooled([])


def test_cool_down_to_an_explicit_temperature():
    watchdog = Watchdog(WatchdogConfig(cool_below_celsius=65))
    assert not watchdog.cooled([gpu(temperature=70)])
    assert watchdog.cooled([gpu(temperature=64)])


def test_restart_budget():
    watchdog = Watchdog(WatchdogConfig(max_restarts=2))
    assert [watchdog.restart_allowed(n) for n in range(4)] == [True, True, False, False]
    assert not Watchdog(WatchdogConfig(max_restarts=0)).restart_allowed(0)
    assert Watchdog().restart_allowed(4) and not Watchdog().restart_allowed(5)


def test_pause_files(tmp_path):
    run_dir = tmp_path / "runs" / "abl-1"
    arm_a = run_dir / "baseline"
    seed_a0, seed_a1 = arm_a / "seed0", arm_a / "seed1"
    seed_b0 = run_dir / "wide" / "seed0"
    for folder in (seed_a0, seed_a1, seed_b0):
        folder.mkdir(parents=True)
    everything = (seed_a0, seed_a1, seed_b0)

    assert not pause_requested(run_dir)
    assert not any(pause_requested(run_dir, d) for d in everything)

    (seed_a1 / "PAUSE").touch()                       # one seed of one arm
    assert [pause_requested(run_dir, d) for d in everything] == [False, True, False]
    assert not pause_requested(run_dir)
    (seed_a1 / "PAUSE").unlink()

    (arm_a / "PAUSE").touch()                          # every seed of one arm
    assert [pause_requested(run_dir, d) for d in everything] == [True, True, False]
    assert pause_requested(run_dir, arm_a)
    (arm_a / "PAUSE").unlink()

    (run_dir / "PAUSE").touch()                        # the whole run
    assert pause_requested(run_dir)
    assert all(pause_requested(run_dir, d) for d in everything)
    (run_dir / "PAUSE").unlink()
    assert not any(pause_requested(run_dir, d) for d in everything)


def test_pause_file_in_an_arm_folder_outside_the_run_folder(tmp_path):
    run_dir, seed_dir = tmp_path / "run", tmp_path / "elsewhere" / "baseline" / "seed0"
    run_dir.mkdir()
    seed_dir.mkdir(parents=True)
    assert not pause_requested(run_dir, seed_dir)
    (seed_dir.parent / "PAUSE").touch()
    assert pause_requested(run_dir, seed_dir)
    assert not pause_requested(run_dir, tmp_path / "elsewhere" / "other")
