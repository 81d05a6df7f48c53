"""Adaptive replicates (`seeds: {min, max}`): when a round of seeds has ended, add one more seed to the arms
whose verdict against the baseline is still open (and to the baseline, so every new seed is paired), until
every verdict is decided, the arms reach `max` seeds, or the next round would cross the budget. Arms stopped
early (orchestrator/early_stop.py) are out of the rounds: they get no further seed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from orchestrator.trainer_registry import arms_on_other_upstreams, load_trainer, measuring_upstream


@dataclass
class Round:
    seed: int | None                      # the seed to add; None: no further round
    reason: str
    arms: list[str] = field(default_factory=list)   # the arms that get it, baseline first


def round_values(arm_runs: list[dict], metric: str, exclude: set[str] | frozenset = frozenset()
                 ) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """From the ledger's arm runs: arm -> seed -> primary metric of its succeeded seeds (the summary, else the
    last logged value), and arm -> the seeds planned for it; the arms in `exclude` (stopped early) left out."""
    values: dict[str, dict[int, float]] = {}
    planned: dict[str, list[int]] = {}
    for row in arm_runs:
        if row["kind"] != "arm" or row["arm"] in exclude:
            continue
        planned.setdefault(row["arm"], []).append(row["seed"])
        values.setdefault(row["arm"], {})
        if row["state"] != "succeeded":
            continue
        for column in ("summary_json", "last_metrics_json"):
            value = json.loads(row[column] or "{}").get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[row["arm"]][row["seed"]] = float(value)
                break
    return values, planned


def arms_without_verdict(arm_runs: list[dict], metric: str, baseline: str) -> tuple[set[str], str]:
    """Arms that can get no verdict on `metric` whatever their seeds (it is measured in an upstream's space, and
    they train another run of that upstream than the baseline), and why; more seeds would buy them nothing."""
    trainers = [load_trainer(name) for name in dict.fromkeys(r["trainer"] for r in arm_runs if r["kind"] == "arm")]
    measured_in = measuring_upstream(trainers, metric)
    if measured_in is None:
        return set(), ""
    arms = arms_on_other_upstreams(arm_runs, baseline, measured_in[1])
    return arms, (f"no seed added to {', '.join(sorted(arms))}: no verdict on {metric}, which is measured in the "
                  f"{measured_in[0]} they change")


def next_round(values: dict[str, dict[int, float]], planned: dict[str, list[int]], baseline: str, mode: str,
               max_seeds: int) -> Round:
    """Which arms get one more seed: those still `inconclusive` against the baseline, while the baseline (which
    gets every seed) has fewer than `max_seeds`."""
    from orchestrator.report.verdicts import compare_to_baseline

    verdicts = compare_to_baseline(values, baseline, mode)
    done = len(planned[baseline])
    open_arms = [arm for arm, v in verdicts.items() if arm != baseline and v.verdict == "inconclusive"]
    if not open_arms:
        decided = ", ".join(f"{arm} {v.verdict}" for arm, v in verdicts.items() if arm != baseline)
        return Round(None, f"every verdict decided after {done} seeds: {decided}")
    names = ", ".join(open_arms)
    if done >= max_seeds:
        return Round(None, f"{names} still inconclusive at the maximum of {max_seeds} seeds")
    seed = max(s for seeds in planned.values() for s in seeds) + 1
    return Round(seed, f"seed {seed} added to arm{'s' if len(open_arms) > 1 else ''} {names} (and the baseline "
                       f"{baseline}): inconclusive after {done} seeds", [baseline] + open_arms)


def over_budget(step: Round, spent: float, finished_arm_runs: int, max_dollars: float | None) -> str | None:
    """Why the round would cross the budget (each new arm run costing what the finished ones cost on average,
    their upstream runs included), or None when it fits."""
    if max_dollars is None or step.seed is None:
        return None
    per_arm_run = spent / finished_arm_runs if finished_arm_runs else 0.0
    estimate = per_arm_run * len(step.arms)
    if spent + estimate <= max_dollars:
        return None
    return (f"seed {step.seed} not added: ${spent:.2f} spent + about ${estimate:.2f} for {len(step.arms)} more arm "
            f"runs would cross the budget of ${max_dollars:.2f}")
