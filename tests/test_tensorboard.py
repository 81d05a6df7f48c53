"""TensorBoard event files written by the driver, read back by TensorBoard's own EventAccumulator (the end-to-end
study that writes them through the real scheduler is test_local_ablation.py's two arms x two seeds)."""

import json

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata, plugin_data_pb2

from orchestrator.spec import Study
from orchestrator.tensorboard import TensorBoardLog, changed_keys, hparams_of, run_logdir
from tests.armature_helpers import ledger

def _accumulator(logdir) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _scalar_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [point.step for point in events.Scalars(tag)]


def _hparams(events: EventAccumulator) -> dict:
    content = events.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in start.hparams.items()}


def assert_every_metric_reads_back(home, run_id: str, changed: dict[str, dict]) -> None:
    """Each arm and seed of a finished study has its TensorBoard run: every metrics row's numbers against their
    steps, the final metrics, the final sample grid at the last step, the HParams session (`changed`: arm ->
    the value of each changed key) and its end. Called by the local end-to-end study (test_local_ablation.py),
    so that one real study answers both."""
    db = ledger(home)
    arm_runs = db.arm_runs(run_id, kind="arm")
    assert arm_runs and {r["arm"] for r in arm_runs} == set(changed)
    for arm_run in arm_runs:
        events = _accumulator(home / run_id / "tensorboard" / arm_run["arm"] / f"seed{arm_run['seed']}")
        rows = db.metric_rows(arm_run["id"])
        keys = {k for row in rows for k in row if k not in ("step", "time")}
        assert keys and keys <= set(events.Tags()["scalars"])
        for key in keys:
            expected = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            got = [(point.step, point.value) for point in events.Scalars(key)]
            assert [s for s, _ in got] == [s for s, _ in expected], key
            assert [g for _, g in got] == pytest.approx([e for _, e in expected], rel=1e-6), key   # float32
        summary = json.loads(arm_run["summary_json"])
        assert events.Scalars("final/recon_mse")[0].value == pytest.approx(summary["recon_mse"], rel=1e-6)
        images = [tag for tag in events.Tags()["images"] if tag.startswith("samples/")]
        assert images and all(events.Images(tag)[-1].step == summary["steps"] for tag in images)
        assert _hparams(events) == {"arm": arm_run["arm"], "seed": float(arm_run["seed"]), **changed[arm_run["arm"]]}
        end = hparams_metadata.parse_session_end_info_plugin_data(
            events.SummaryMetadata(hparams_metadata.SESSION_END_INFO_TAG).plugin_data.content)
        assert end.status == 1      # STATUS_SUCCESS
    assert "tensorboard --logdir" in (home / run_id / "results.md").read_text()


def _arm_run(tmp_path, arm="a", seed=0) -> dict:
    out_dir = tmp_path / arm / f"seed{seed}"
    (out_dir / "samples").mkdir(parents=True)
    return {"id": 1, "arm": arm, "seed": seed, "kind": "arm", "out_dir": str(out_dir),
            "config_json": json.dumps({"lr": 0.001, "model": {"dim": 32, "layers": [1, 2]}})}


def _rows(steps):
    return [{"step": step, "time": 1_000_000.0 + step, "loss": 1.0 / step, "ok": True} for step in steps]


def test_a_resumed_run_writes_each_step_once_even_from_a_new_driver(tmp_path):
    arm_run = _arm_run(tmp_path)
    first = TensorBoardLog(tmp_path, ["lr", "model.dim"])
    first.metrics(arm_run, _rows(range(1, 6)))
    first.close()                                        # the driver dies; a resume starts a new one
    second = TensorBoardLog(tmp_path, ["lr", "model.dim"])
    second.metrics(arm_run, _rows(range(3, 9)))          # the attempt repeats steps after its checkpoint
    second.metrics(arm_run, _rows([8, 9]))
    second.close()
    events = _accumulator(run_logdir(tmp_path, "a", 0))
    assert _scalar_steps(events, "loss") == list(range(1, 10))
    assert "ok" not in events.Tags()["scalars"]          # a bool is not a scalar
    assert len(events.Tags()["tensors"]) == 1            # one HParams session start, not one per driver


def test_sample_grids_appear_at_their_steps_and_the_final_one_at_the_last_step(tmp_path):
    arm_run = _arm_run(tmp_path)
    samples = tmp_path / "a" / "seed0" / "samples"
    log = TensorBoardLog(tmp_path, [])
    Image.new("RGB", (8, 6), (255, 0, 0)).save(samples / "samples_step000010.png")
    log.metrics(arm_run, _rows([10]))
    Image.new("RGB", (8, 6), (0, 255, 0)).save(samples / "samples_step000020.png")
    (samples / "samples_step000030.png").write_bytes(b"half a png")     # not readable yet: taken later
    log.metrics(arm_run, _rows([20]))
    Image.new("RGB", (8, 6), (0, 0, 255)).save(samples / "samples_step000030.png")
    Image.new("RGB", (8, 6), (9, 9, 9)).save(samples / "samples.png")
    log.ended(arm_run, "succeeded", {"steps": 40, "fid": 12.5, "diverged": False}, 40)
    log.close()
    events = _accumulator(run_logdir(tmp_path, "a", 0))
    images = events.Images("samples/samples")
    assert [(image.step, image.width, image.height) for image in images] == [(10, 8, 6), (20, 8, 6), (30, 8, 6),
                                                                           (40, 8, 6)]
    assert events.Scalars("final/fid")[0].step == 40 and "final/diverged" not in events.Tags()["scalars"]
    end = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata(hparams_metadata.SESSION_END_INFO_TAG).plugin_data.content)
    assert end.session_end_info.status == 1


def test_the_hparams_columns_are_every_key_an_arm_or_the_grid_changes():
    study = Study.model_validate({
        "name": "x", "trainer": "vqvae", "metric": {"name": "recon_mse", "mode": "min"},
        "grid": {"batch_size": [8, 16]},
        "arms": [{"name": "a"}, {"name": "b", "set": {"model": {"codebook_size": 16}, "lr": 0.1}},
                 {"name": "c", "set": {"lr": 0.2}}]})
    assert changed_keys(study) == ["model.codebook_size", "lr", "batch_size"]


def test_hparams_hold_the_arm_seed_and_the_changed_keys_as_tensorboard_takes_them():
    arm_run = {"arm": "wide", "seed": 3, "config_json": json.dumps({"lr": 0.01, "model": {"dim": 64, "sizes": [1]}})}
    assert hparams_of(arm_run, ["lr", "model.dim", "model.sizes", "absent.key"]) == {
        "arm": "wide", "seed": 3, "lr": 0.01, "model.dim": 64, "model.sizes": "[1]"}


def test_an_unwritable_folder_turns_logging_off_without_stopping_anything(tmp_path, capsys):
    arm_run = _arm_run(tmp_path)
    (tmp_path / "tensorboard").write_text("a file where the folder should be")
    log = TensorBoardLog(tmp_path, [])
    log.metrics(arm_run, _rows([1]))
    log.metrics(arm_run, _rows([2]))
    assert log.broken and capsys.readouterr().err.count("TensorBoard logging stopped") == 1
