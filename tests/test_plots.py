"""The report's plots: a figure per declared metric (primary first), seeds' own lines beside the mean, arms told
apart by line style, and the samples figure built from the trainer's declared grid across seeds and steps."""

import json
import os

import pytest
from PIL import Image

from orchestrator.ledger import Ledger
from orchestrator.report import write_report
from orchestrator.report.collect import collect_results
from orchestrator.report.plots import arm_styles, curve_figure, sample_images, spread_steps

RUN_ID = "plots-20250101-120000"
STEPS = (10, 20, 30)
RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)


def _study(tmp_path, trainer="maskgit", arms=("baseline", "same-as-baseline"), seeds=(0, 1)):
    """A finished study whose arms have identical curves; every seed leaves `samples` grids at steps 10 and 20
    (red), a final one (blue for seed 0, yellow for seed 1) and a newer `inpaint.png` (green)."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    run_dir = tmp_path / RUN_ID
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(f"name: plots\ntrainer: {trainer}\n")
    ledger.create_run(RUN_ID, name="plots", trainer=trainer, backend="local", spec_path="arms/plots.yaml",
                      metric="fid", metric_mode="min", baseline="baseline", budget_dollars=None,
                      git_commit="abc1234", git_diff_hash="d1ff")
    for arm in arms:
        for seed in seeds:
            out_dir = run_dir / arm / f"seed{seed}"
            arm_run = ledger.add_arm_run(RUN_ID, arm=arm, seed=seed, kind="arm", trainer=trainer, config={},
                                         config_hash=f"{arm}{seed}", out_dir=str(out_dir), total_steps=30,
                                         gpus=0, cpus=1, gpu_memory_gb=None)
            attempt = ledger.start_attempt(arm_run, backend="local", host="box", hardware="cpu")
            ledger.record_metrics(arm_run, attempt, [
                {"step": step, "time": 1e6 + step, "loss": 2.0 / step + seed, "fid": 100.0 / step + seed,
                 "inpaint_mse": 0.5 / step} for step in STEPS])
            ledger.end_attempt(attempt, "succeeded")
            for state in ("running", "collecting", "succeeded"):
                ledger.transition(arm_run, state)
            samples = out_dir / "samples"
            samples.mkdir(parents=True)
            for step in (10, 20):
                Image.new("RGB", (64, 64), RED).save(samples / f"samples_step{step:06d}.png")
            Image.new("RGB", (64, 64), BLUE if seed == 0 else YELLOW).save(samples / "samples.png")
            Image.new("RGB", (64, 64), GREEN).save(samples / "inpaint.png")
            os.utime(samples / "inpaint.png", (2e9, 2e9))     # the newest file is not the declared grid
            (out_dir / "summary.json").write_text(json.dumps({"steps": 30, "fid": 33.3 + seed}))
    ledger.set_run_state(RUN_ID, "finished")
    return ledger, run_dir


def _colours(path) -> set:
    with Image.open(path) as image:
        return {colour for _, colour in image.convert("RGB").getcolors(1 << 20)}


def test_one_figure_per_declared_metric_primary_first_then_loss_and_samples(tmp_path):
    ledger, run_dir = _study(tmp_path)
    paths = write_report(ledger, RUN_ID, run_dir)
    results = collect_results(ledger, RUN_ID, run_dir)
    assert list(results.metrics)[0] == "fid"
    drawn = list(paths.plots)
    assert drawn[:2] == ["primary_metric", "metric_inpaint_mse"] and drawn[-2:] == ["loss", "samples"]
    for path in paths.plots.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 400
    declared_without_rows = {f"metric_{key}" for key in results.metrics} - {"metric_fid", "metric_inpaint_mse"}
    assert set(paths.skipped_plots) == declared_without_rows
    markdown = paths.markdown.read_text()
    assert markdown.index("plots/primary_metric.png") < markdown.index("plots/metric_inpaint_mse.png")

    (run_dir / "plots" / "metric_gone.png").write_bytes(b"a metric an older report drew")
    write_report(ledger, RUN_ID, run_dir)
    assert not (run_dir / "plots" / "metric_gone.png").exists()


def test_each_seed_has_a_thin_line_and_identical_arms_differ_in_style(tmp_path):
    ledger, run_dir = _study(tmp_path)
    results = collect_results(ledger, RUN_ID, run_dir)
    figure = curve_figure(results, "fid", "fid", arm_styles(results.arms))
    lines = figure.axes[0].get_lines()
    thin = [line for line in lines if line.get_linewidth() < 1]
    thick = [line for line in lines if line.get_linewidth() > 2]
    assert len(thin) == 4 and len(thick) == 2                     # 2 arms x 2 seeds, and each arm's mean
    assert sorted(tuple(line.get_ydata()) for line in thin)[0] == (10.0, 5.0, 100.0 / 30)   # seed 0's own values
    assert list(thick[0].get_ydata()) == pytest.approx([10.5, 5.5, 100.0 / 30 + 0.5])   # their mean
    assert list(thick[0].get_ydata()) == list(thick[1].get_ydata())   # identical curves ...
    assert thick[0].get_linestyle() != thick[1].get_linestyle()       # ... told apart by style and marker
    assert thick[0].get_marker() != thick[1].get_marker()
    assert curve_figure(results, "not_logged", "x", arm_styles(results.arms)) is None


def test_samples_come_from_the_declared_grid_across_seeds_and_steps(tmp_path):
    ledger, run_dir = _study(tmp_path)
    results = collect_results(ledger, RUN_ID, run_dir)
    assert results.samples_images["maskgit"] == "samples"
    seed = results.arms[0].seeds[0]
    chosen = sample_images(seed, "samples")
    assert {step: path.name for step, path in chosen.items()} == {
        10: "samples_step000010.png", 20: "samples_step000020.png", 30: "samples.png"}
    path = write_report(ledger, RUN_ID, run_dir).plots["samples"]
    colours = _colours(path)
    assert {RED, BLUE, YELLOW} <= colours and GREEN not in colours    # both seeds, steps, never inpaint.png


def test_a_trainer_declares_its_grid_and_a_missing_one_is_said(tmp_path):
    ledger, run_dir = _study(tmp_path, trainer="vqvae")
    results = collect_results(ledger, RUN_ID, run_dir)
    assert results.samples_images["vqvae"] == "recon"
    paths = write_report(ledger, RUN_ID, run_dir)
    assert paths.skipped_plots["samples"] == "no arm run has a samples/recon.png"


def test_spread_steps_keeps_first_and_last():
    assert spread_steps([5, 10]) == [5, 10]
    assert spread_steps(list(range(100, 1100, 100)), 4) == [100, 400, 700, 1000]
