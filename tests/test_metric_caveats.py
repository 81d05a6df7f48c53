"""A primary metric that a degenerate model can flatter, or that is measured in an upstream's own space, must not
hand out a "better" its data cannot support: known answers through the real report on a real ledger."""

import csv
import json

import pytest

from orchestrator.ledger import Ledger
from orchestrator.report import write_report
from orchestrator.trainer_registry import arms_on_other_upstreams, available_trainers, load_trainer, measuring_upstream

RUN_ID = "caveats"
SEEDS = range(4)


def finished_study(tmp_path, trainer, metric, mode, summaries, upstream_of):
    """A finished study: `summaries` arm -> seed -> summary.json; `upstream_of` arm -> the name of the upstream
    (per seed) its seeds use for `tokenizer_dir`, as the scheduler records it."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    run_dir = tmp_path / RUN_ID
    ledger.create_run(RUN_ID, name="caveats", trainer=trainer, backend="local", spec_path=None, metric=metric,
                      metric_mode=mode, baseline="baseline", budget_dollars=None, git_commit="abc1234",
                      git_diff_hash=None)
    upstreams = {}
    for name in dict.fromkeys(upstream_of.values()):
        for seed in SEEDS:
            upstreams[name, seed] = _finished(ledger, run_dir, name, seed, "upstream", "vqvae", {}, {})
    for arm, by_seed in summaries.items():
        for seed, summary in by_seed.items():
            _finished(ledger, run_dir, arm, seed, "arm", trainer, summary,
                      {"tokenizer_dir": upstreams[upstream_of[arm], seed]})
    ledger.set_run_state(RUN_ID, "finished")
    write_report(ledger, RUN_ID, run_dir)
    rows = {row["arm"]: row for row in csv.DictReader(open(run_dir / "results.csv"))}
    return rows, (run_dir / "results.md").read_text()


def _finished(ledger, run_dir, arm, seed, kind, trainer, summary, upstream_ids):
    out_dir = run_dir / arm / f"seed{seed}"
    out_dir.mkdir(parents=True)
    (out_dir / "summary.json").write_text(json.dumps({"steps": 10, **summary}))
    arm_run = ledger.add_arm_run(RUN_ID, arm=arm, seed=seed, kind=kind, trainer=trainer, config={"seed": seed},
                                 config_hash=f"{arm}{seed}", out_dir=str(out_dir), total_steps=10, gpus=0, cpus=1,
                                 gpu_memory_gb=None, upstream_ids=upstream_ids)
    ledger.end_attempt(ledger.start_attempt(arm_run, backend="local", hardware="cpu"), "succeeded", exit_code=0)
    for state in ("running", "collecting", "succeeded"):
        ledger.transition(arm_run, state)
    return arm_run


def test_a_token_metric_gives_no_verdict_to_an_arm_with_its_own_tokenizer(tmp_path):
    """The round-one trap: a collapsed codebook makes masked tokens easy to guess. The arm that trains another
    tokenizer gets no verdict on masked accuracy; an arm that shares the baseline's tokenizer still gets one."""
    summaries = {"baseline": {s: {"heldout_masked_acc": 0.10 + 0.01 * s} for s in SEEDS},
                 "small-codebook": {s: {"heldout_masked_acc": 0.40 + 0.01 * s} for s in SEEDS},
                 "deeper": {s: {"heldout_masked_acc": 0.20 + 0.012 * s} for s in SEEDS}}
    rows, answer = finished_study(tmp_path, "maskgit", "heldout_masked_acc", "max", summaries,
                                  {"baseline": "tok", "small-codebook": "tok-16", "deeper": "tok"})
    assert rows["deeper"]["verdict"] == "better"
    assert rows["small-codebook"]["verdict"] == "inconclusive" and rows["small-codebook"]["p_adjusted"] == ""
    assert "not comparable" in rows["small-codebook"]["verdict_note"]
    assert float(rows["small-codebook"]["diff_mean"]) == pytest.approx(0.30)      # the difference is still shown
    assert "Caution: heldout_masked_acc is measured in the tokenizer's own space" in answer.split("## ")[0]


def test_a_precision_win_bought_with_recall_is_not_called_better(tmp_path):
    """Precision rewards mode collapse: the collapsed arm is more precise and far worse on recall and coverage."""
    def summary(precision, recall, s):
        return {"precision_scratchenc": precision + 0.01 * s, "recall_scratchenc": recall + 0.01 * s,
                "coverage_scratchenc": recall + 0.012 * s}
    summaries = {"baseline": {s: summary(0.60, 0.60, s) for s in SEEDS},
                 "collapsed": {s: summary(0.95, 0.05, s) for s in SEEDS},
                 "sharper": {s: summary(0.80, 0.61, s) for s in SEEDS}}
    rows, answer = finished_study(tmp_path, "dcgan", "precision_scratchenc", "max", summaries,
                                  {arm: "none" for arm in summaries})
    assert rows["sharper"]["verdict"] == "better"
    assert rows["collapsed"]["verdict"] == "inconclusive"
    assert rows["collapsed"]["verdict_note"].startswith("better on precision_scratchenc but worse on recall_scratchenc")
    head = answer.split("## ")[0]
    assert "Caution: precision_scratchenc is flattered by mode collapse" in head
    assert "Better: sharper" in head and "collapsed" in head.split("Inconclusive: ")[1]


@pytest.mark.parametrize("name", available_trainers())
def test_every_caveat_names_metrics_and_upstreams_the_trainer_has(name):
    info = load_trainer(name)
    for metric, (what, guards) in info.flattered_by.items():
        assert metric in info.metrics and what and guards and set(guards) <= set(info.metrics), metric
        assert metric not in guards
    for metric, upstream_field in info.measured_in.items():
        assert metric in info.metrics and upstream_field in info.upstream, metric


def test_arms_on_other_upstreams_are_found_seed_by_seed_from_the_ledger_rows():
    def row(arm, seed, tokenizer, kind="arm"):
        return {"arm": arm, "seed": seed, "kind": kind, "upstream_ids": json.dumps({"tokenizer_dir": tokenizer})}
    rows = [row("baseline", 0, 1), row("baseline", 1, 2), row("deeper", 0, 1), row("deeper", 1, 2),
            row("small-codebook", 0, 3), row("small-codebook", 1, 4), row("tok", 0, None, kind="upstream"),
            row("late", 2, 9)]                           # a seed the baseline does not have: nothing to pair
    assert arms_on_other_upstreams(rows, "baseline", "tokenizer_dir") == {"small-codebook"}
    assert measuring_upstream([load_trainer("maskgit")], "heldout_masked_acc") == ("tokenizer", "tokenizer_dir")
    assert measuring_upstream([load_trainer("maskgit")], "kid_scratchenc") is None
