"""The report: results.csv numbers and verdicts checked by hand, results.md content (the answer first, upstream
summaries, per-seed values), the hardware warning, the terminal table, the plots."""

import csv
import json
import math
import os

import pytest
from PIL import Image
from rich.console import Console

from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.report import write_report
from orchestrator.report.collect import collect_results
from orchestrator.report.plots import sample_images
from trainers import vqvae

RUN_ID = "codebook-20250101-120000"
ARMS = ("baseline", "small-codebook", "wide")
STEPS = (10, 20, 30, 40, 50)
EVAL_STEPS = (20, 40, 50)

# Final recon_mse / codebook_usage per (arm, seed). ("wide", 1) diverges; ("small-codebook", 1) leaves no
# summary.json, so its values come from the ledger's last metrics (its last eval row).
FINAL = {
    ("baseline", 0): (0.10, 0.5), ("baseline", 1): (0.12, 0.7),
    ("small-codebook", 0): (0.20, 0.9), ("small-codebook", 1): (0.16, 1.0),
    ("wide", 0): (0.08, 0.4),
}
COLOURS = {"baseline": (200, 40, 40), "small-codebook": (40, 160, 40), "wide": (40, 40, 200)}
SPEC_YAML = """\
name: codebook
trainer: vqvae
description: Does a smaller codebook hurt reconstruction?
arms:
  - name: baseline
  - name: small-codebook
    description: 32 codes instead of 512
    set: {vq.codebook_size: 32}
  - name: wide
seeds: 2
metric: {name: recon_mse, mode: min}
baseline: baseline
"""


UPSTREAM_SUMMARY = {"steps": 50, "recon_mse": 0.02, "codebook_usage": 0.83, "perplexity": 97.5, "top4_mass": 0.11}


def build_study(tmp_path, hardware=None, gpus=1.0, baseline="baseline", trainer="vqvae", with_data=True,
                final=None, seeds=(0, 1), diverged=("wide", 1)):
    """A finished study in a fresh ledger: 3 arms x 2 seeds + 1 upstream run, as the scheduler would leave it.
    `final` replaces FINAL (and `seeds` the seeds) for studies with other numbers."""
    final = final or FINAL
    hardware = hardware or {arm: "NVIDIA A100-SXM4-80GB" for arm in ARMS}
    ledger = Ledger(tmp_path / "ledger.sqlite")
    run_dir = tmp_path / RUN_ID
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(SPEC_YAML)
    ledger.create_run(RUN_ID, name="codebook", trainer=trainer, backend="local", spec_path="arms/codebook.yaml",
                      metric="recon_mse", metric_mode="min", baseline=baseline, budget_dollars=None,
                      git_commit="abc1234", git_diff_hash="d1ff")
    upstream = ledger.add_arm_run(RUN_ID, arm="vqvae-tokenizer", seed=0, kind="upstream", trainer="vqvae",
                                  config={}, config_hash="u1", out_dir=str(run_dir / "_upstream" / "vqvae-tokenizer"),
                                  total_steps=50, gpus=gpus, cpus=1, gpu_memory_gb=None)
    _attempt(ledger, upstream, "succeeded", hardware["baseline"], seconds=900)
    if with_data:
        (run_dir / "_upstream" / "vqvae-tokenizer").mkdir(parents=True)
        (run_dir / "_upstream" / "vqvae-tokenizer" / "summary.json").write_text(json.dumps(UPSTREAM_SUMMARY))
    _end(ledger, upstream, "succeeded")
    for arm in ARMS:
        for seed in seeds:
            out_dir = run_dir / arm / f"seed{seed}"
            arm_run = ledger.add_arm_run(RUN_ID, arm=arm, seed=seed, kind="arm", config={"seed": seed},
                                         config_hash=f"{arm}{seed}", out_dir=str(out_dir), total_steps=50,
                                         gpus=gpus, cpus=2, gpu_memory_gb=None, upstream_ids={"tokenizer": upstream})
            diverges = (arm, seed) == diverged
            attempt = _attempt(ledger, arm_run, "diverged" if diverges else "succeeded", hardware[arm],
                               seconds=600 if diverges else 1800)
            if with_data:
                ledger.record_metrics(arm_run, attempt, _metric_rows(arm, seed, diverges, final))
                _write_outputs(out_dir, arm, seed, diverges, final)
            _end(ledger, arm_run, "diverged" if diverges else "succeeded",
                 "non-finite loss at step 40" if diverges else None)
    ledger.set_run_state(RUN_ID, "finished")
    return ledger, run_dir


def _end(ledger, arm_run, state, reason=None):
    """The moves the scheduler makes: running, collecting when it succeeded, then the final state."""
    ledger.transition(arm_run, "running")
    if state == "succeeded":
        ledger.transition(arm_run, "collecting")
    ledger.transition(arm_run, state, reason)


def _attempt(ledger, arm_run, state, hardware, seconds):
    attempt = ledger.start_attempt(arm_run, backend="local", host="box", hardware=hardware)
    ledger.end_attempt(attempt, state)
    ledger.update_attempt(attempt, started_at=1_000_000.0, ended_at=1_000_000.0 + seconds)
    return attempt


def _metric_rows(arm, seed, diverges, final):
    final_mse = final.get((arm, seed), (0.5, 0.0))[0]
    rows = []
    for step in STEPS:
        loss = (1 + 0.4 * ARMS.index(arm)) * 2.0 * math.exp(-step / 8) * (1 + 0.1 * seed) + 0.01
        row = {"step": step, "time": 1_000_000.0 + step, "loss": loss}
        if diverges and step >= 40:
            row["loss"] = float("nan")
        if step in EVAL_STEPS:
            row["recon_mse"] = final_mse * (1 + (50 - step) / 25)
        rows.append(row)
    return rows[:4] if diverges else rows


def _write_outputs(out_dir, arm, seed, diverges, final):
    samples = out_dir / "samples"
    samples.mkdir(parents=True)
    Image.new("RGB", (66, 66), (128, 128, 128)).save(samples / "recon_step000020.png")
    os.utime(samples / "recon_step000020.png", (1_000_000, 1_000_000))
    grid = Image.new("RGB", (66, 66), (255, 255, 255))
    for i in range(4):
        tile = Image.new("RGB", (30, 30), tuple(min(255, c + 20 * i) for c in COLOURS[arm]))
        grid.paste(tile, (2 + 32 * (i % 2), 2 + 32 * (i // 2)))
    grid.save(samples / "recon.png")
    if diverges:
        (out_dir / "summary.json").write_text(json.dumps({"diverged": True, "reason": "non-finite loss"}))
    elif (arm, seed) != ("small-codebook", 1):
        mse, usage = final[(arm, seed)]
        (out_dir / "summary.json").write_text(json.dumps(
            {"steps": 50, "wall_time_s": 12.5, "loss": 0.05, "recon_mse": mse, "codebook_usage": usage,
             "perplexity": 100.0 + seed, "diverged": False}))


def _csv_rows(run_dir):
    with open(run_dir / "results.csv", newline="") as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def test_csv_has_means_stds_and_verdicts_computed_by_hand(tmp_path):
    ledger, run_dir = build_study(tmp_path)
    write_report(ledger, RUN_ID, run_dir)
    rows = _csv_rows(run_dir)
    assert list(rows) == list(ARMS)
    base, small, wide = rows["baseline"], rows["small-codebook"], rows["wide"]

    baseline_std = math.sqrt(((0.10 - 0.11) ** 2 + (0.12 - 0.11) ** 2) / 1)   # ddof=1
    assert float(base["recon_mse_mean"]) == pytest.approx(0.11)
    assert float(base["recon_mse_std"]) == pytest.approx(baseline_std)
    assert float(base["codebook_usage_mean"]) == pytest.approx(0.6)
    assert float(base["codebook_usage_std"]) == pytest.approx(math.sqrt(0.02))
    assert (base["is_baseline"], base["verdict"], base["n_paired"], base["diff_mean"], base["wins"]) == (
        "1", "baseline", "2", "", "")

    # seed 1 has no summary.json: its recon_mse (0.16) comes from the last eval row in the ledger
    assert float(small["recon_mse_mean"]) == pytest.approx(0.18)
    assert float(small["recon_mse_std"]) == pytest.approx(math.sqrt(0.0008))
    assert float(small["perplexity_mean"]) == pytest.approx(100.0)   # only seed 0's summary has it
    assert (small["perplexity_n"], small["perplexity_std"]) == ("1", "")
    # paired differences 0.20 - 0.10 and 0.16 - 0.12: mean 0.07, standard error 0.03, t = 7/3 on 1 degree of
    # freedom (Cauchy: p = 1 - 2/pi atan|t|), interval 0.07 ± t(0.975, 1) x 0.03; the only arm with a test
    assert float(small["diff_mean"]) == pytest.approx(0.07)
    assert float(small["diff_ci_low"]) == pytest.approx(0.07 - 12.706204736 * 0.03)
    assert float(small["diff_ci_high"]) == pytest.approx(0.07 + 12.706204736 * 0.03)
    assert float(small["p_value"]) == pytest.approx(1 - 2 / math.pi * math.atan(7 / 3))
    assert float(small["p_adjusted"]) == pytest.approx(float(small["p_value"]))
    assert (small["verdict"], small["wins"], small["n_paired"], small["diff_bca_low"]) == (
        "inconclusive", "0/2", "2", "")

    # the diverged seed is counted, and its last recon_mse in the ledger stays out of the mean and the pairs
    assert (wide["n_seeds"], wide["n_succeeded"], wide["n_diverged"], wide["n_failed"]) == ("2", "1", "1", "0")
    assert float(wide["recon_mse_mean"]) == pytest.approx(0.08)
    assert wide["recon_mse_std"] == ""
    assert (wide["verdict"], wide["n_paired"], wide["wins"], wide["p_value"], wide["diff_ci_low"]) == (
        "inconclusive", "1", "1/1", "", "")
    assert float(wide["diff_mean"]) == pytest.approx(-0.02)
    assert "one seed: nothing can be concluded" in wide["verdict_note"]
    assert "seed 1 of baseline left out" in wide["verdict_note"]
    assert not any(column.startswith("delta") or column == "is_best" for column in base)

    assert float(base["gpu_hours"]) == pytest.approx(1.0)
    assert float(wide["gpu_hours"]) == pytest.approx(0.5 + 600 / 3600)
    assert float(base["cpu_hours"]) == 0
    assert base["hardware"] == "NVIDIA A100-SXM4-80GB"
    assert base["top4_mass_mean"] == "" and base["top4_mass_std"] == ""   # a METRICS key no summary has


def test_markdown_opens_with_the_answer_then_table_per_seed_values_upstream_plots_and_notes(tmp_path):
    ledger, run_dir = build_study(tmp_path)
    paths = write_report(ledger, RUN_ID, run_dir)
    text = paths.markdown.read_text()
    assert text.startswith("# codebook: results\n\n**recon_mse (lower is better), each arm against baseline")
    answer = text.split("- Run:", 1)[0]
    assert "- Better: none\n- Worse: none\n" in answer
    assert "- Inconclusive: small-codebook +0.07 [-0.311, +0.451], wins 0/2, n=2, p=0.258; " \
           "wide -0.02, wins 1/1, n=1 (seed 1 of baseline left out (wide has no value there); " \
           "one seed: nothing can be concluded)" in answer
    assert RUN_ID in text and "`vqvae`" in text and "`abc1234`" in text and "`d1ff`" in text
    assert "Does a smaller codebook hurt reconstruction?" in text
    assert "`small-codebook`: 32 codes instead of 512" in text
    assert "| Arm | Seeds | n | recon_mse ↓ | codebook_usage ↑ |" in text
    assert "| Verdict | diff recon_mse [95% CI] | Wins | p (Holm) | GPU-h | Hardware |" in text
    assert "| baseline | 2 succeeded | 2 | 0.11 ± 0.014 | 0.6 ± 0.14 |" in text
    assert "| small-codebook | 2 succeeded | 2 | 0.18 ± 0.028 | 0.9 (n=1) |" in text
    assert "| wide | 1 succeeded, 1 diverged | 1 | 0.08 | 0.4 |" in text
    assert "| baseline | — | — | — |" in text and "| inconclusive | +0.07 [-0.311, +0.451] | 0/2 | 0.258 |" in text
    assert "★" not in text and "σ" not in text     # no arm is better; no delta in std units
    assert "ddof=1" in text and "Holm" in text
    assert "- Seeds per arm: `baseline` 2, `small-codebook` 2, `wide` 1 (n compared;" in text
    per_seed = text.split("### recon_mse per seed", 1)[1].split("##", 1)[0]
    assert "| Arm | seed 0 | seed 1 |" in per_seed
    assert "| small-codebook | 0.2 (+0.1) | 0.16 (+0.04) |" in per_seed and "| wide | 0.08 (-0.02) | diverged |" in per_seed
    assert "different hardware" not in text
    upstream = text.split("## Upstream runs", 1)[1].split("## Plots", 1)[0]
    assert "### vqvae" in upstream
    assert "| Upstream | Used by | Seed | State | recon_mse | codebook_usage | perplexity | top4_mass |" in upstream
    assert "| vqvae-tokenizer | all arms | 0 | 1 succeeded | 0.02 | 0.83 | 97.5 | 0.11 |" in upstream
    for name in ("primary_metric", "loss", "samples"):
        assert f"(plots/{name}.png)" in text
    notes = text.split("## Notes", 1)[1]
    assert "wide seed 1: diverged: non-finite loss at step 40; excluded from the means" in notes
    assert "small-codebook seed 1: no summary.json" in notes


# Four seeds; the seed moves every arm alike (what pairing removes), small-codebook is worse, wide is better.
DECISIVE = {(arm, seed): (0.10 + 0.03 * seed + shift + jitter, 0.5)
            for arm, shift in (("baseline", 0.0), ("small-codebook", 0.05), ("wide", -0.02))
            for seed, jitter in enumerate((0.0, 0.002, -0.001, 0.001) if arm != "baseline" else (0, 0, 0, 0))}


def test_a_decided_study_stars_only_the_better_arm_and_says_so_first(tmp_path):
    ledger, run_dir = build_study(tmp_path, final=DECISIVE, seeds=(0, 1, 2, 3), diverged=None)
    added = "seed 3 added to arms small-codebook, wide (and the baseline baseline): inconclusive after 3 seeds"
    ledger.event(RUN_ID, "seeds.add", seed=3, arms=list(ARMS), reason=added)
    ledger.event(RUN_ID, "seeds.done", reason="every verdict decided after 4 seeds: small-codebook worse, wide better")
    paths = write_report(ledger, RUN_ID, run_dir)
    rows = _csv_rows(run_dir)
    assert [rows[arm]["verdict"] for arm in ARMS] == ["baseline", "worse", "better"]
    assert rows["wide"]["wins"] == "4/4" and rows["small-codebook"]["wins"] == "0/4"
    assert float(rows["wide"]["diff_mean"]) == pytest.approx(-0.02 + 0.0005)
    assert float(rows["wide"]["p_adjusted"]) < 0.05 and float(rows["wide"]["diff_ci_high"]) < 0
    text = paths.markdown.read_text()
    answer = text.split("- Run:", 1)[0]
    # differences -0.02 + (0, 0.002, -0.001, 0.001): mean -0.0195, sd 0.00129, half-width t(0.975, 3) x sd / 2
    assert "- Better: wide -0.0195 [-0.0216, -0.0174], wins 4/4, n=4, p<0.001\n" in answer
    assert "- Worse: small-codebook +0.0505 [" in answer and "- Inconclusive: none" in answer
    assert "| wide ★ |" in text and text.count("★") == 2     # the row and the legend
    assert "### recon_mse per seed" not in text            # four seeds: the table's n and interval say it
    assert (f"- Seeds per arm: `baseline` 4, `small-codebook` 4, `wide` 4 (n compared; a seed that did not succeed "
            f"is left out, and adaptive seeds are added only to arms whose verdict is still open)\n  - {added}\n"
            f"  - every verdict decided after 4 seeds: small-codebook worse, wide better\n") in text


def test_one_seed_per_arm_says_nothing_can_be_concluded(tmp_path):
    ledger, run_dir = build_study(tmp_path, seeds=(0,), diverged=None)
    paths = write_report(ledger, RUN_ID, run_dir)
    text = paths.markdown.read_text()
    assert text.startswith("# codebook: results\n\n"
                           "**One seed per arm: nothing can be concluded; run with seeds >= 3.**\n")
    assert "★" not in text
    assert {row["verdict"] for row in _csv_rows(run_dir).values()} == {"baseline", "inconclusive"}
    assert "| wide | 0.08 (-0.02) |" in text.split("### recon_mse per seed", 1)[1]


def test_each_seed_randomises_line_comes_from_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setattr(vqvae, "SEED_RANDOMISES", ["model initialisation", "batch order"], raising=False)
    ledger, run_dir = build_study(tmp_path / "declared")
    text = write_report(ledger, RUN_ID, run_dir).markdown.read_text()
    assert "- Each seed randomises: model initialisation, batch order\n" in text

    monkeypatch.delattr(vqvae, "SEED_RANDOMISES", raising=False)
    ledger, run_dir = build_study(tmp_path / "undeclared")
    assert "Each seed randomises" not in write_report(ledger, RUN_ID, run_dir).markdown.read_text()


@pytest.mark.parametrize("width", [250, 100, 72])
def test_terminal_table_shows_verdict_interval_and_n_at_any_width(tmp_path, width):
    ledger, run_dir = build_study(tmp_path)
    console = Console(record=True, width=width)
    write_report(ledger, RUN_ID, run_dir, console=console)
    terminal = console.export_text()
    assert max(len(line) for line in terminal.splitlines()) <= width
    assert "inconclusive" in terminal and "+0.07 [-0.311, +0.451]" in terminal and "0.11 ± 0.014" in terminal
    assert "Better: none" in terminal
    assert ("Hardware" in terminal) == (width == 250)


def test_mixed_hardware_warning_only_when_arms_differ(tmp_path):
    mixed = {"baseline": "NVIDIA A100-SXM4-80GB", "small-codebook": "NVIDIA A100-SXM4-80GB",
             "wide": "NVIDIA GeForce RTX 4090"}
    ledger, run_dir = build_study(tmp_path, hardware=mixed)
    console = Console(record=True, width=250)
    write_report(ledger, RUN_ID, run_dir, console=console)
    text = (run_dir / "results.md").read_text()
    assert "> **Warning:** arms ran on different hardware" in text
    assert "wide: NVIDIA GeForce RTX 4090" in text
    terminal = console.export_text()
    assert "warning: arms ran on different hardware" in terminal
    assert "small-codebook" in terminal and "0.11 ± 0.014" in terminal

    same = Console(record=True, width=250)
    ledger2, run_dir2 = build_study(tmp_path / "same")
    write_report(ledger2, RUN_ID, run_dir2, console=same)
    assert "different hardware" not in same.export_text()


def test_cpu_arms_show_cpu_hours_and_cpu_vs_gpu_warns(tmp_path):
    hardware = {"baseline": "cpu (AMD EPYC 7B13)", "small-codebook": "cpu (AMD EPYC 7B13)", "wide": "NVIDIA L4"}
    ledger, run_dir = build_study(tmp_path, hardware=hardware, gpus=0)
    write_report(ledger, RUN_ID, run_dir)
    rows = _csv_rows(run_dir)
    assert float(rows["baseline"]["cpu_hours"]) == pytest.approx(2 * 0.5 * 2)   # 2 seeds x 0.5 h x 2 cores
    assert float(rows["baseline"]["gpu_hours"]) == 0
    text = (run_dir / "results.md").read_text()
    assert "| CPU-h | Hardware |" in text and "GPU-h" not in text
    assert "different hardware" in text


def test_plots_are_valid_images(tmp_path):
    ledger, run_dir = build_study(tmp_path)
    paths = write_report(ledger, RUN_ID, run_dir)
    assert set(paths.plots) == {"primary_metric", "loss", "samples"}
    assert set(paths.skipped_plots) == {"metric_codebook_usage", "metric_perplexity", "metric_top4_mass",
                                        "metric_dead_codes"}    # declared metrics no metrics row carries
    for path in paths.plots.values():
        assert path.parent == run_dir / "plots"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 400
            assert len(image.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 50   # not blank


def test_the_declared_sample_grid_is_the_one_shown_at_its_steps(tmp_path):
    ledger, run_dir = build_study(tmp_path)
    results = collect_results(ledger, RUN_ID, run_dir)
    chosen = sample_images(results.arms[0].succeeded[0], results.samples_images["vqvae"])
    assert {step: path.name for step, path in chosen.items()} == {20: "recon_step000020.png", 50: "recon.png"}


def test_no_baseline_means_no_verdicts(tmp_path):
    ledger, run_dir = build_study(tmp_path, baseline=None)
    write_report(ledger, RUN_ID, run_dir)
    text = (run_dir / "results.md").read_text()
    assert text.startswith("# codebook: results\n\n**No verdicts: the spec names no baseline arm.**")
    assert "Verdict" not in text.split("| Arm |", 1)[1].split("\n", 1)[0]
    assert all(row["verdict"] == "" and row["diff_mean"] == "" for row in _csv_rows(run_dir).values())


def test_missing_data_skips_plots_and_says_so(tmp_path):
    ledger, run_dir = build_study(tmp_path, trainer="not-a-trainer", with_data=False)
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "loss.png").write_bytes(b"stale")
    paths = write_report(ledger, RUN_ID, run_dir)
    assert paths.plots == {} and set(paths.skipped_plots) == {"primary_metric", "loss", "samples"}
    assert not (run_dir / "plots" / "loss.png").exists()
    text = paths.markdown.read_text()
    assert "not drawn, no metrics row carries 'recon_mse'" in text
    assert "not drawn, no arm run has a samples/samples.png" in text
    rows = _csv_rows(run_dir)   # unknown trainer: the primary metric alone, with no values anywhere
    assert rows["baseline"]["recon_mse_mean"] == "" and rows["baseline"]["verdict"] == ""


def test_unknown_run_is_a_user_error(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(UserError, match="unknown run id"):
        write_report(ledger, "nope", tmp_path / "nope")
