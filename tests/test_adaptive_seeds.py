"""Adaptive replicates (`seeds: {min, max}`): one more seed per round, only where a verdict is still open."""

import json

from orchestrator.adaptive import Round, arms_without_verdict, next_round, over_budget, round_values
from tests.armature_helpers import armature, ledger, tiny_spec

BASELINE = {0: 1.00, 1: 1.10, 2: 0.90}
BETTER = {0: 0.50, 1: 0.61, 2: 0.39}          # 0.5 lower on every seed, give or take 0.01
NOISE = {0: 1.20, 1: 0.95, 2: 0.92}           # no consistent difference


def test_open_arms_and_the_baseline_get_the_next_seed():
    planned = {arm: [0, 1, 2] for arm in ("base", "better", "noise")}
    step = next_round({"base": BASELINE, "better": BETTER, "noise": NOISE}, planned, "base", "min", max_seeds=8)
    assert step == Round(3, "seed 3 added to arm noise (and the baseline base): inconclusive after 3 seeds",
                         ["base", "noise"])


def test_no_round_once_decided_or_at_the_maximum():
    planned = {arm: [0, 1, 2] for arm in ("base", "better")}
    done = next_round({"base": BASELINE, "better": BETTER}, planned, "base", "min", max_seeds=8)
    assert done.seed is None and done.reason == "every verdict decided after 3 seeds: better better"
    worse = next_round({"base": BASELINE, "better": BETTER}, planned, "base", "max", max_seeds=8)
    assert worse.seed is None and worse.reason.endswith("better worse")
    planned["noise"] = [0, 1, 2]
    full = next_round({"base": BASELINE, "better": BETTER, "noise": NOISE}, planned, "base", "min", max_seeds=3)
    assert full.seed is None and full.reason == "noise still inconclusive at the maximum of 3 seeds"


def test_an_arm_without_results_stays_open_and_seeds_continue_after_the_highest():
    planned = {"base": [0, 1, 2, 3], "broken": [0, 1, 2, 3]}
    step = next_round({"base": {**BASELINE, 3: 1.0}, "broken": {}}, planned, "base", "min", max_seeds=5)
    assert step.seed == 4 and step.arms == ["base", "broken"]


def test_a_round_that_would_cross_the_budget_is_not_added():
    step = Round(3, "open", ["base", "a", "b"])
    assert over_budget(step, spent=6.0, finished_arm_runs=6, max_dollars=None) is None
    assert over_budget(step, spent=6.0, finished_arm_runs=6, max_dollars=9.0) is None      # 6 + 3 x $1
    assert over_budget(step, spent=6.0, finished_arm_runs=6, max_dollars=8.5) == (
        "seed 3 not added: $6.00 spent + about $3.00 for 3 more arm runs would cross the budget of $8.50")


def test_values_come_from_the_summaries_of_succeeded_arm_runs():
    def row(arm, seed, state="succeeded", kind="arm", summary=None, last=None):
        return {"arm": arm, "seed": seed, "state": state, "kind": kind,
                "summary_json": json.dumps(summary) if summary else None,
                "last_metrics_json": json.dumps(last) if last else None}
    rows = [row("upstream-vqvae-1", 0, kind="upstream", summary={"m": 9}),
            row("a", 0, summary={"m": 1.5}), row("a", 1, last={"m": 2}), row("a", 2, state="failed", last={"m": 3}),
            row("b", 0, state="cancelled")]
    values, planned = round_values(rows, "m")
    assert values == {"a": {0: 1.5, 1: 2.0}, "b": {}}
    assert planned == {"a": [0, 1, 2], "b": [0]}


def test_a_new_seed_brings_its_upstream_runs_once_and_reuses_the_shared_ones(tmp_path):
    from orchestrator.ledger import Ledger
    from orchestrator.runs import add_replicate, create_run
    from orchestrator.spec import load_plan

    spec = tiny_spec(tmp_path, """name: mg
trainer: maskgit
metric: {name: kid_scratchenc, mode: min}
baseline: a
arms:
  - name: a
  - name: b
    set: {decode_steps: 4}
  - name: c
    set: {tokenizer.model.codebook_size: 16}
seeds: {min: 2, max: 4}
""")
    db = Ledger(tmp_path / "ledger.sqlite")
    create_run(db, load_plan(spec), "mg", tmp_path / "mg", "local", {"commit": "x", "diff_hash": None}, gpus=0)
    before = {r["id"] for r in db.arm_runs("mg")}
    added = add_replicate(db, "mg", tmp_path / "mg", ["a", "b"], 2)
    rows = {r["id"]: r for r in db.arm_runs("mg")}
    new = [rows[i] for i in added]
    assert set(added) == set(rows) - before
    assert sorted((r["kind"], r["trainer"]) for r in new) == [
        ("arm", "maskgit"), ("arm", "maskgit"), ("upstream", "judge"), ("upstream", "vqvae")]
    assert all(r["seed"] == 2 and json.loads(r["config_json"])["data"]["draw"] == 2 for r in new)
    a, b = (r for r in new if r["kind"] == "arm")
    assert json.loads(a["upstream_ids"]) == json.loads(b["upstream_ids"])     # one tokenizer, one judge for both
    for_c = [db.arm_run(i) for i in add_replicate(db, "mg", tmp_path / "mg", ["c"], 2)]
    assert [(r["kind"], r["trainer"]) for r in for_c] == [("upstream", "vqvae"), ("arm", "maskgit")]  # judge reused
    assert json.loads(for_c[1]["upstream_ids"]) == {"tokenizer_dir": for_c[0]["id"],
                                                    "judge_dir": json.loads(a["upstream_ids"])["judge_dir"]}


# dead_codes is a count, and 4 steps leave every encoding on one code: an arm that changes nothing the trainer
# computes ties the baseline on every seed (inconclusive), and a 4-code codebook has 1020 dead codes fewer than
# the baseline's 1024 on every seed (better: the same difference on 3 seeds counts as p = 0).
STUDY = """name: adaptive
trainer: vqvae
metric: {name: dead_codes, mode: min}
baseline: a
base: {steps: 4, eval_every: 4, checkpoint_every: 4, log_every: 2, batch_size: 16, data.num_train: 64,
       data.num_heldout: 16, model.codebook_size: 1024}
arms:
  - name: a
  - name: same
    set: {log_every: 4}
  - name: far
    set: {model.codebook_size: 4}
seeds: {min: 3, max: 4}
resources: {gpus: 0, cpus: 0.25}
"""


def test_an_open_arm_gets_another_seed_and_a_decided_one_does_not(tmp_path):
    home = tmp_path / "home"
    result = armature(home, "ablation", str(tiny_spec(tmp_path, STUDY)), "--run-id", "ad", "--metrics-port", "-1")
    assert result.returncode == 0, result.stdout + result.stderr
    db = ledger(home)
    arm_runs = db.arm_runs("ad")
    assert sorted((r["arm"], r["seed"]) for r in arm_runs) == sorted(
        [("a", s) for s in range(4)] + [("same", s) for s in range(4)] + [("far", s) for s in range(3)])
    for arm_run in arm_runs:
        assert arm_run["state"] == "succeeded"
        config = json.loads(arm_run["config_json"])
        assert config["seed"] == config["data"]["draw"] == arm_run["seed"]
    decisions = [(e["kind"], json.loads(e["detail_json"])["reason"]) for e in db.events("ad", "seeds.")]
    assert decisions == [
        ("seeds.add", "seed 3 added to arm same (and the baseline a): inconclusive after 3 seeds"),
        ("seeds.done", "same still inconclusive at the maximum of 4 seeds")]
    assert db.get_run("ad")["state"] == "finished"


def test_arms_that_can_get_no_verdict_get_no_more_seeds():
    """MaskGIT's masked accuracy is measured in the tokenizer's codes: an arm training its own tokenizer gets no
    verdict on it however many seeds it has, so an adaptive round leaves it out and says why."""
    def row(arm, seed, tokenizer, value):
        return {"arm": arm, "seed": seed, "kind": "arm", "trainer": "maskgit", "state": "succeeded",
                "upstream_ids": json.dumps({"tokenizer_dir": tokenizer, "judge_dir": 100 + seed}),
                "summary_json": json.dumps({"heldout_masked_acc": value}), "last_metrics_json": None}
    rows = [row(arm, s, tok + s, value + 0.01 * (s % 2)) for s in range(3)
            for arm, tok, value in (("baseline", 10, 0.1), ("small-codebook", 20, 0.1), ("deeper", 10, 0.1))]
    no_verdict, why = arms_without_verdict(rows, "heldout_masked_acc", "baseline")
    assert no_verdict == {"small-codebook"} and "no verdict on heldout_masked_acc" in why
    values, planned = round_values(rows, "heldout_masked_acc", exclude=no_verdict)
    step = next_round(values, planned, "baseline", "max", max_seeds=5)
    assert step.seed == 3 and step.arms == ["baseline", "deeper"]
    assert arms_without_verdict(rows, "kid_scratchenc", "baseline") == (set(), "")
