"""Early stopping of decided arms and successive halving (orchestrator/early_stop.py), with known answers: the
boundary's false-stop rate on simulated null data, a planted worse arm stopped through the real scheduler, arms
equal to the baseline left running, halving cutting the arms it should, and the report keeping stopped arms apart."""

import csv
import json
import math

import numpy as np
import pytest

from orchestrator.early_stop import (EarlyStopper, halving_rungs, look_alphas, planned_looks, rung_keeps,
                                     worse_than_baseline)
from orchestrator.errors import SpecError
from orchestrator.ledger import Ledger
from tests.armature_helpers import armature, ledger, tiny_spec

# ---- the boundary ------------------------------------------------------------------------------------------


def test_alpha_is_spent_over_the_planned_looks_and_never_more():
    assert look_alphas([0.25, 0.5, 0.75], 0.05) == pytest.approx([0.05 / 3] * 3)
    spent = look_alphas([0.2, 0.4, 0.6, 0.8], 0.05, "obrien-fleming")
    assert spent == sorted(spent) and spent[0] < 1e-4, "O'Brien-Fleming spends almost nothing early"
    assert sum(spent) <= 0.05 and sum(look_alphas([0.5, 1.0], 0.05, "obrien-fleming")) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="increase"):
        look_alphas([0.5, 0.2])


def _false_stop_rate(alphas: list[float], reps: int, rng, seeds: int = 4, arms: int = 2) -> float:
    """Null data: every arm's interim values are distributed like the baseline's at every look (a seed effect
    shared by the arms, as pairing has it, plus an autocorrelated training noise). The share of studies in which
    some arm is stopped as worse at some look, each arm tested at the look's alpha split over the arms."""
    stops = 0
    for _ in range(reps):
        seed_effect = rng.normal(size=seeds)
        noise = np.zeros((arms + 1, seeds))
        for alpha in alphas:
            noise = 0.5 * noise + rng.normal(size=noise.shape)
            values = {f"arm{i}": {s: float(seed_effect[s] + noise[i, s]) for s in range(seeds)}
                      for i in range(arms + 1)}
            if any(worse_than_baseline(values, f"arm{i}", "arm0", "min", alpha / arms).verdict == "worse"
                   for i in range(1, arms + 1)):
                stops += 1
                break
    return stops / reps


def test_on_null_data_false_stops_stay_below_alpha_and_a_raw_threshold_would_not():
    rng = np.random.default_rng(7)
    corrected = _false_stop_rate(look_alphas([0.2, 0.4, 0.6, 0.8], 0.05), 500, rng)
    assert corrected <= 0.05, corrected
    raw = _false_stop_rate([0.05 * 2] * 4, 250, rng)      # alpha at every look and for every arm: no correction
    assert raw > 0.05, f"the uncorrected rule should stop null arms too often, got {raw}"


def test_a_stop_reads_the_paired_test_one_sided_for_the_worse_side():
    """Differences 1, 2, 3 (mean 2, sd 1): t = 2 sqrt(3) on 2 degrees of freedom, two-sided p 0.0742. A stop claims
    only "worse", so it is tested at the worse side's p, 0.0371: below 0.05 where the arm is worse (lower is
    better here), 1 - 0.0371 where it is better, which never stops."""
    base = {0: 5.0, 1: 5.0, 2: 5.0}
    higher = {"base": base, "arm": {0: 6.0, 1: 7.0, 2: 8.0}}
    worse = worse_than_baseline(higher, "arm", "base", "min", 0.05)
    assert worse.p_value == pytest.approx(0.0742 / 2, abs=1e-4) and worse.verdict == "worse"
    assert worse_than_baseline(higher, "arm", "base", "min", 0.03).verdict == "inconclusive"
    better = worse_than_baseline(higher, "arm", "base", "max", 0.05)      # higher is better: the arm is better
    assert better.p_value == pytest.approx(1 - 0.0742 / 2, abs=1e-4) and better.verdict == "inconclusive"
    shift = {"base": base, "arm": {0: 6.0, 1: 6.0, 2: 6.0}}             # the same difference on 3 seeds: p = 0
    assert worse_than_baseline(shift, "arm", "base", "min", 1e-6).verdict == "worse"
    assert worse_than_baseline(shift, "arm", "base", "max", 0.5).verdict == "inconclusive"


def test_looks_and_rungs_are_shared_evaluation_steps():
    configs = [{"steps": 100, "eval_every": 10}, {"steps": 120, "eval_every": 20}]
    assert planned_looks(configs, after_step=1, looks=3) == [40, 60, 80]     # ~1/4, 2/4, 3/4 of 100, every 20
    assert planned_looks(configs, after_step=70, looks=3) == [80]
    assert halving_rungs(configs, grace_steps=10, reduction_factor=3) == [10, 30, 90]


def test_a_rung_keeps_the_best_fraction_of_the_arms_arrived_so_far():
    assert rung_keeps(5.0, [], "min", 2) == (True, 1, 1)           # the first arm at a rung always goes on
    assert rung_keeps(0.3, [0.5], "min", 2) == (True, 1, 2)
    assert rung_keeps(0.9, [0.5, 0.3], "min", 2) == (False, 3, 3)
    assert rung_keeps(0.9, [0.5, 0.3], "max", 2) == (True, 1, 3)
    assert rung_keeps(None, [0.5], "max", 2) == (False, 2, 2)      # no value ranks last


# ---- the spec ------------------------------------------------------------------------------------------------

SPEC = """name: es
trainer: vqvae
metric: {name: recon_mse, mode: min}
baseline: base
base: {steps: 40, eval_every: 10, checkpoint_every: 10, log_every: 10, batch_size: 16, data.num_train: 64,
       data.num_heldout: 16}
arms:
  - name: base
  - name: worse
    set: {lr: 1.0e-9}
  - name: same
    set: {log_every: 5}
seeds: 3
resources: {gpus: 0, cpus: 0.25}
"""


def test_the_spec_takes_the_mapping_and_the_old_list_and_explains_mistakes(tmp_path):
    from orchestrator.spec import load_plan

    plan = load_plan(tiny_spec(tmp_path, SPEC + "early_stop: {decided: true, halving: {grace_steps: 10}}\n"))
    assert plan.study.early_stop.decided and plan.study.early_stop.halving.reduction_factor == 2
    rules = load_plan(tiny_spec(tmp_path, SPEC + "early_stop: [{metric: loss, below: 1}]\n")).study.early_stop
    assert not rules.decided and rules.rules[0].below == 1
    no_baseline = SPEC.replace("baseline: base\n", "") + "early_stop: {decided: true}\n"
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: early_stop.decided: .*needs a `baseline:`"):
        load_plan(tiny_spec(tmp_path, no_baseline))
    with pytest.raises(SpecError, match=r"early_stop.halving: rungs at steps \[15, 30\]: arm 'base' does not "
                                        r"evaluate at step 15 \(eval_every 10\)"):
        load_plan(tiny_spec(tmp_path, SPEC + "early_stop: {halving: {grace_steps: 15}}\n"))
    with pytest.raises(SpecError, match="no evaluation step that every arm shares"):
        load_plan(tiny_spec(tmp_path, SPEC + "early_stop: {decided: true, after_step: 40}\n"))


# ---- decisions on a real ledger ------------------------------------------------------------------------------------

BASE = {0: 0.10, 1: 0.12, 2: 0.11}
WORSE = {0: 0.30, 1: 0.33, 2: 0.31}                 # 0.2 higher on every seed, give or take 0.01
SAME = {0: 0.101, 1: 0.118, 2: 0.1105}              # no consistent difference


def _planned_run(tmp_path, early_stop: str, spec: str = SPEC):
    from orchestrator.runs import create_run
    from orchestrator.spec import load_plan

    plan = load_plan(tiny_spec(tmp_path, spec + f"early_stop: {early_stop}\n"))
    db = Ledger(tmp_path / "ledger.sqlite")
    create_run(db, plan, "es", tmp_path / "es", "local", {"commit": "x", "diff_hash": None}, gpus=0)
    ids = {(r["arm"], r["seed"]): r["id"] for r in db.arm_runs("es")}
    for arm_run_id in ids.values():
        db.transition(arm_run_id, "running")
    return plan.study, db, ids


def _log(db, ids, arm, values, step, metric="recon_mse"):
    for seed, value in values.items():
        db.record_metrics(ids[(arm, seed)], None, [{"step": step, metric: value}])


def _stopper(db, study):
    return EarlyStopper.for_run(db, "es", study.early_stop, study.metric.name, study.metric.mode, study.baseline)


def test_a_worse_arm_is_stopped_once_its_seeds_reach_a_look_and_an_equal_one_is_not(tmp_path):
    study, db, ids = _planned_run(tmp_path, "{decided: true, looks: 2}")
    stopper = _stopper(db, study)
    assert stopper.looks == [20, 30] and stopper.alphas == pytest.approx([0.025, 0.025])
    _log(db, ids, "base", BASE, 20)
    _log(db, ids, "same", SAME, 20)
    _log(db, ids, "worse", {0: WORSE[0], 1: WORSE[1]}, 20)       # seed 2 of `worse` is not there yet
    assert stopper.check(db.arm_runs("es")) == []
    _log(db, ids, "worse", {2: WORSE[2]}, 20)
    decisions = stopper.check(db.arm_runs("es"))
    assert [(d.arm, d.rule, d.step, d.reason) for d in decisions] == [
        ("worse", "worse", 20, "stopped early: worse at step 20")]
    assert "p " in decisions[0].why and "< 0.0125" in decisions[0].why      # 0.025 for the look, over 2 arms
    looks = [json.loads(e["detail_json"]) for e in db.events("es", "early_stop.look")]
    assert {(d["arm"], d["verdict"]) for d in looks} == {("worse", "worse"), ("same", "inconclusive")}

    _log(db, ids, "base", BASE, 30)
    _log(db, ids, "same", SAME, 30)
    assert stopper.check(db.arm_runs("es")) == []
    resumed = _stopper(db, study)                # a resumed run: no look twice, the stop remembered
    assert resumed.stopped == {"worse": "stopped early: worse at step 20"}
    assert resumed.check(db.arm_runs("es")) == []
    assert len(db.events("es", "early_stop.look")) == 3 and len(db.events("es", "early_stop.stop")) == 1


def test_a_resumed_scheduler_cancels_the_pending_runs_of_a_stopped_arm_and_launches_none(tmp_path):
    from orchestrator.backends.local import LocalBackend
    from orchestrator.scheduler import Scheduler

    study, db, ids = _planned_run(tmp_path, "{decided: true, looks: 2}")
    _log(db, ids, "base", BASE, 20)
    _log(db, ids, "same", SAME, 20)
    _log(db, ids, "worse", WORSE, 20)
    _stopper(db, study).check(db.arm_runs("es"))
    for arm_run_id in ids.values():              # what settle_orphans leaves after the orchestrator died
        db.transition(arm_run_id, "pending", "resumed after the orchestrator stopped")
    scheduler = Scheduler(db, "es", study, LocalBackend(), tmp_path / "es")
    assert scheduler._stop_decided_arms(db.arm_runs("es"))
    rows = db.arm_runs("es")
    assert {(r["arm"], r["state"], r["reason"]) for r in rows if r["arm"] == "worse"} == {
        ("worse", "cancelled", "stopped early: worse at step 20")}
    assert {r["arm"] for r in scheduler._ready(rows)} == {"base", "same"}


def test_halving_cuts_the_arms_ranked_below_the_kept_fraction_and_never_the_baseline(tmp_path):
    spec = SPEC.replace("seeds: 3", "seeds: 1").replace("""  - name: same
    set: {log_every: 5}""", """  - name: b1
    set: {lr: 1.0e-3}
  - name: b2
    set: {lr: 3.0e-3}
  - name: b3
    set: {lr: 1.0e-4}""")
    study, db, ids = _planned_run(tmp_path, "{halving: {grace_steps: 10, reduction_factor: 2}}", spec)
    stopper = _stopper(db, study)
    assert stopper.rungs == [10, 20]
    arrivals = [("base", 0.9), ("worse", 0.5), ("b1", 0.3), ("b2", 0.8), ("b3", 0.4)]
    cut = []
    for arm, value in arrivals:                  # arms reach rung 10 one after another, as on few slots
        _log(db, ids, arm, {0: value}, 10)
        cut += [d.arm for d in stopper.check(db.arm_runs("es"))]
    # worse 1st of 1, b1 1st of 2, b2 3rd of 3 (ceil(3/2) = 2 go on), b3 2nd of 4: the baseline is never ranked
    assert cut == ["b2"]
    for arm, value in [("worse", 0.45), ("b1", 0.2), ("b3", 0.5)]:
        _log(db, ids, arm, {0: value}, 20)
        cut += [d.arm for d in stopper.check(db.arm_runs("es"))]
    assert cut == ["b2", "b3"]
    assert db.arm_run(ids[("b3", 0)])["state"] == "running", "the stopper decides; the scheduler stops"
    why = [json.loads(e["detail_json"]) for e in db.events("es", "early_stop.stop")]
    assert [(d["arm"], d["reason"]) for d in why] == [("b2", "stopped by halving at step 10"),
                                                      ("b3", "stopped by halving at step 20")]
    assert "rank 3 of the 3 arms" in why[0]["why"]


def test_the_report_keeps_stopped_arms_out_of_the_verdicts_and_quotes_the_decision(tmp_path):
    from orchestrator.report import write_report

    study, db, ids = _planned_run(tmp_path, "{decided: true, looks: 2}")
    _log(db, ids, "base", BASE, 20)
    _log(db, ids, "same", SAME, 20)
    _log(db, ids, "worse", WORSE, 20)
    _stopper(db, study).check(db.arm_runs("es"))
    for (arm, seed), arm_run_id in ids.items():
        if arm == "worse":
            db.transition(arm_run_id, "cancelled", "stopped early: worse at step 20")
            continue
        db.transition(arm_run_id, "collecting")
        db.set_summary(arm_run_id, {"recon_mse": (BASE if arm == "base" else SAME)[seed]})
        db.transition(arm_run_id, "succeeded")
    paths = write_report(db, "es", tmp_path / "es")
    rows = {row["arm"]: row for row in csv.DictReader(open(paths.csv))}
    assert rows["worse"]["stopped_early"] == "stopped early: worse at step 20"
    assert (rows["worse"]["stopped_rule"], rows["worse"]["stopped_step"], rows["worse"]["verdict"]) == (
        "worse", "20", "")
    assert rows["same"]["verdict"] == "inconclusive" and rows["same"]["stopped_early"] == ""
    assert rows["same"]["p_adjusted"] == rows["same"]["p_value"], "Holm over 1 arm: the stopped one is not in it"
    text = paths.markdown.read_text()
    answer = text.split("- Run:")[0]
    assert "Stopped early (no final verdict): worse (stopped early: worse at step 20)" in answer
    stopped = text.split("## Stopped early")[1].split("## ")[0]
    assert "> **worse**: stopped early: worse at step 20. recon_mse at step 20: mean difference +0.2033" in stopped
    table_row = next(line for line in text.splitlines() if line.startswith("| worse"))
    assert "stopped early: worse at step 20" in table_row


# ---- through `armature ablation` -------------------------------------------------------------------------------

PLANTED = """name: planted-stop
trainer: vqvae
seeds: 3
metric: {name: recon_mse, mode: min}
baseline: baseline
early_stop: {decided: true, looks: 3}
base: {steps: 240, eval_every: 20, checkpoint_every: 20, log_every: 20, batch_size: 16, data.num_train: 64,
       data.num_heldout: 16}
arms:
  - name: baseline
  - name: crippled
    description: a learning rate near zero, so the model stays at its initialisation
    set: {lr: 1.0e-9}
resources: {gpus: 0, cpus: 0.25}
"""


def test_a_planted_worse_arm_is_stopped_at_a_checkpoint_and_reported_apart(tmp_path):
    home = tmp_path / "home"
    result = armature(home, "ablation", str(tiny_spec(tmp_path, PLANTED)), "--run-id", "ps", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    db = ledger(home)
    stop = [json.loads(e["detail_json"]) for e in db.events("ps", "early_stop.stop")]
    assert [(d["arm"], d["rule"]) for d in stop] == [("crippled", "worse")]
    step = stop[0]["step"]
    assert step in (60, 120, 180)
    runs = {(r["arm"], r["seed"]): r for r in db.arm_runs("ps")}
    assert all(runs[("baseline", s)]["state"] == "succeeded" for s in range(3))
    crippled = [runs[("crippled", s)] for s in range(3)]
    stopped = [r for r in crippled if r["state"] == "cancelled"]
    assert all(r["reason"] == f"stopped early: worse at step {step}" for r in stopped)
    assert any(r["last_step"] < 240 for r in stopped), "some crippled seed was cut short, saving its last steps"
    for run in stopped:                          # stopped through SIGTERM: the trainer checkpointed first (143),
        attempt = db.attempts(run["id"])[-1]     # or, stopped while still starting up, died of it (-15)
        assert attempt["state"] == "interrupted" and attempt["exit_code"] in (143, -15), attempt
    assert any(db.attempts(r["id"])[-1]["exit_code"] == 143 for r in stopped), "no stopped seed checkpointed"
    rows = {row["arm"]: row for row in csv.DictReader(open(home / "ps" / "results.csv"))}
    assert rows["crippled"]["stopped_early"] == f"stopped early: worse at step {step}"
    assert rows["crippled"]["verdict"] == ""
    text = (home / "ps" / "results.md").read_text()
    assert f"> **crippled**: stopped early: worse at step {step}. recon_mse at step {step}" in text
    assert not math.isnan(float(rows["baseline"]["recon_mse_mean"]))
