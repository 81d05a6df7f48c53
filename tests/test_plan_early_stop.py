"""The early-stopping plan shown by `armature validate` and before `armature ablation` (orchestrator/planview.py
`early_stop_lines`): the looks, the alpha each spends and each arm is tested at, and the halving rungs, checked
against what the scheduler's EarlyStopper actually plans and uses on a real ledger."""

import json
import re

import pytest

from orchestrator.early_stop import EarlyStopper
from orchestrator.errors import SpecError
from orchestrator.ledger import Ledger
from orchestrator.planview import early_stop_lines
from orchestrator.runs import create_run
from orchestrator.spec import load_plan
from tests.armature_helpers import armature, tiny_spec

SPEC = """name: esplan
trainer: vqvae
metric: {name: recon_mse, mode: min}
baseline: base
base: {steps: 40, eval_every: 10, checkpoint_every: 10, log_every: 10, batch_size: 16, data.num_train: 64,
       data.num_heldout: 16}
arms:
  - name: base
  - name: small_lr
    set: {lr: 1.0e-4}
  - name: logs_more
    set: {log_every: 5}
seeds: 3
resources: {gpus: 0, cpus: 0.25}
"""
FOURTH_ARM = "  - name: big_batch\n    set: {batch_size: 32}\nseeds: 3\n"


def _plan_and_stopper(tmp_path, spec: str):
    """The plan as `validate` prints it, and the EarlyStopper the scheduler would build for that plan's run."""
    plan = load_plan(tiny_spec(tmp_path, spec))
    db = Ledger(tmp_path / "ledger.sqlite")
    create_run(db, plan, "esplan", tmp_path / "esplan", "local", {"commit": "x", "diff_hash": None}, gpus=0)
    study = plan.study
    stopper = EarlyStopper.for_run(db, "esplan", study.early_stop, study.metric.name, study.metric.mode,
                                   study.baseline)
    return plan, db, stopper


def _alphas_used(db: Ledger, stopper: EarlyStopper) -> list[float]:
    """The per-arm alpha of each look as EarlyStopper.check tests it: every seed of every arm logs a value at
    every look (the arms' paired differences from the baseline change sign, so no arm is stopped and every arm
    takes every look), then the ledger's look events."""
    rows = db.arm_runs("esplan", kind="arm")
    arms = sorted({row["arm"] for row in rows} - {"base"})
    for row in rows:
        db.transition(row["id"], "running")
    for step in stopper.looks:
        for row in rows:
            offset = 0 if row["arm"] == "base" else arms.index(row["arm"]) + 1
            value = 0.1 + offset * (0.01, -0.01, 0.002)[row["seed"]]
            db.record_metrics(row["id"], None, [{"step": step, "recon_mse": value}])
    assert stopper.check(db.arm_runs("esplan")) == []
    by_look: dict[int, set[float]] = {}
    for event in db.events("esplan", "early_stop.look"):
        detail = json.loads(event["detail_json"])
        by_look.setdefault(detail["look"], set()).add(detail["alpha"])
    assert sorted(by_look) == list(range(1, len(stopper.looks) + 1))
    assert all(len(alphas) == 1 for alphas in by_look.values()), "every arm is tested at the same alpha in a look"
    return [by_look[k].pop() for k in sorted(by_look)]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(", ")]


@pytest.mark.parametrize("early_stop, extra_arm, compared", [
    ("{decided: true, looks: 2}", "", 2),
    ("{decided: true, looks: 3, boundary: obrien-fleming}", FOURTH_ARM, 3),
], ids=["bonferroni-2-looks", "obrien-fleming-3-looks"])
def test_the_decided_plan_shows_the_looks_and_alphas_the_scheduler_uses(tmp_path, early_stop, extra_arm, compared):
    spec = SPEC.replace("seeds: 3\n", extra_arm or "seeds: 3\n") + f"early_stop: {early_stop}\n"
    plan, db, stopper = _plan_and_stopper(tmp_path, spec)
    lines = early_stop_lines(plan)
    assert len(lines) == 1, lines
    shown = re.fullmatch(
        r"early stop \(decided\): looks at steps (?P<looks>[\d, ]+) of 40; alpha per look (?P<alphas>[\d., e-]+) "
        r"\((?P<boundary>[a-z-]+) over the looks\), total (?P<total>[\d.e-]+) of the study's alpha 0.05; each of "
        r"the (?P<compared>\d+) arms compared with base is tested at the look's alpha / \d+ = (?P<per_arm>[\d., e-]+) "
        r"\(Bonferroni over arms\); an arm is stopped when worse than base at a look by the study's paired t-test "
        r"on recon_mse at that step, one-sided \(a stop claims only worse\)", lines[0])
    assert shown, lines[0]
    assert [int(s) for s in _numbers(shown["looks"])] == stopper.looks
    assert len(stopper.looks) == len(stopper.alphas) == compared     # 2 looks with 2 arms, 3 with 3: both vary
    assert _numbers(shown["alphas"]) == pytest.approx(stopper.alphas, rel=5e-3)
    assert float(shown["total"]) == pytest.approx(sum(stopper.alphas), rel=5e-3)
    assert shown["boundary"] == stopper.boundary and int(shown["compared"]) == compared
    assert _numbers(shown["per_arm"]) == pytest.approx(_alphas_used(db, stopper), rel=5e-3)


def test_one_compared_arm_is_tested_at_the_looks_alpha(tmp_path):
    spec = SPEC.replace("  - name: logs_more\n    set: {log_every: 5}\n", "") + "early_stop: {decided: true}\n"
    plan, db, stopper = _plan_and_stopper(tmp_path, spec)
    [line] = early_stop_lines(plan)
    assert "the one arm compared with base is tested at the look's alpha;" in line and "Bonferroni" not in line
    assert _alphas_used(db, stopper) == pytest.approx(stopper.alphas)


def test_the_halving_plan_shows_the_rungs_and_the_fraction_kept(tmp_path):
    plan, _, stopper = _plan_and_stopper(tmp_path, SPEC + "early_stop: {halving: {grace_steps: 10, "
                                                          "reduction_factor: 3}}\n")
    [line] = early_stop_lines(plan)
    assert stopper.rungs == [10, 30] and stopper.looks == []
    assert line.startswith(f"early stop (halving): rungs at steps {', '.join(map(str, stopper.rungs))}; keep the "
                           f"best 1/3 at each rung: ")
    assert "best ceil(k/3) of the k arms that reached the rung so far" in line and "base is never ranked" in line


def test_bound_rules_are_shown_and_nothing_without_early_stop(tmp_path):
    bound = load_plan(tiny_spec(tmp_path, SPEC + "early_stop: [{metric: loss, above: 10, after_step: 5}]\n"))
    assert early_stop_lines(bound) == ["early stop (bound): an arm run stops when loss is above 10 at or after "
                                       "step 5"]
    assert early_stop_lines(load_plan(tiny_spec(tmp_path, SPEC))) == []


def test_validate_prints_the_early_stop_plan(tmp_path):
    both = tiny_spec(tmp_path, SPEC + "early_stop: {decided: true, looks: 2, halving: {grace_steps: 10}}\n", "es.yaml")
    plain = tiny_spec(tmp_path, SPEC, "plain.yaml")
    result = armature(tmp_path / "home", "validate", str(both), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ("early stop (decided): looks at steps 20, 30 of 40; alpha per look 0.025, 0.025 (bonferroni over the "
            "looks), total 0.05 of the study's alpha 0.05; each of the 2 arms compared with base is tested at the "
            "look's alpha / 2 = 0.0125, 0.0125 (Bonferroni over arms)") in out, out
    assert "early stop (halving): rungs at steps 10, 20; keep the best 1/2 at each rung" in out, out
    assert out.index("early stop (decided)") < out.index("resources per arm run")
    result = armature(tmp_path / "home", "validate", str(plain), timeout=120)
    assert result.returncode == 0 and "early stop" not in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("rule", ["{decided: true}", "{halving: {grace_steps: 10, reduction_factor: 2}}"])
def test_early_stopping_on_a_metric_a_degenerate_model_can_flatter_is_refused(tmp_path, rule):
    """A stop or a halving rung ranks arms by the primary metric; on a VAE's `kl` (posterior collapse wins) it
    could end the arm that is really better. The same study without early_stop, or on recon_mse, is fine."""
    on_kl = SPEC.replace("trainer: vqvae", "trainer: vae").replace("recon_mse, mode: min", "kl, mode: min") \
        .replace("lr: 1.0e-4", "geco_alpha: 0.5")
    assert load_plan(tiny_spec(tmp_path, on_kl))
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: early_stop\.(decided|halving) ranks arms .* kl is flattered "
                                        r"by posterior collapse.*a stop could end the arm that is really better"):
        load_plan(tiny_spec(tmp_path, on_kl.replace("seeds: 3", f"seeds: 3\nearly_stop: {rule}")))
    assert load_plan(tiny_spec(tmp_path, SPEC.replace("seeds: 3", f"seeds: 3\nearly_stop: {rule}")))
