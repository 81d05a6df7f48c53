"""Stop arms whose fate is already known, from the primary metric the trainers log at their evaluations.

Two rules, both set under `early_stop:` in the spec (orchestrator/spec.py, `EarlyStopping`):

Decided (`decided: true`): an arm shown *worse* than the baseline at an interim look is stopped.
- Looks are planned before the run: evaluation steps every arm shares (multiples of every arm's eval_every),
  at or after `after_step` and before the shortest arm's last step, thinned to at most `looks` of them, placed
  near k/(looks+1) of training (`planned_looks`). Each arm takes each look once, as soon as every seed of it and
  of the baseline has logged that step (or ended): arms do not wait for each other, so an arm that runs early on
  few slots is judged early.
- At a look the study's own statistics decide (report/verdicts.py `compare_to_baseline`): the arm against the
  baseline on the paired seeds' values *at that step*, the same paired t-test read one-sided (`worse_than_baseline`):
  a stop claims only "worse", so its p-value is that of the worse side, and `worse` is when it is below the look's
  alpha. (A two-sided test would spend half of each look's alpha on "better", which never stops anything.)
- The correction is alpha spending with a union bound (`look_alphas`, `look_alpha`): look k gets alpha_k, the
  alpha_k add up to at most the study's alpha, and each arm is tested at alpha_k / m, m the arms compared with the
  baseline (Bonferroni over arms: they are looked at one by one as they arrive, so Holm, which ranks all arms
  at once, is not available). `boundary: bonferroni` (default) splits alpha equally over the planned looks;
  `boundary: obrien-fleming` spends by the Lan-DeMets O'Brien-Fleming-type function
  a(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) at training fractions t (almost nothing early, most late). The
  union bound is used rather than the classical group-sequential boundaries because the looks here are the same
  seeds at later steps, not more samples: their correlation is unknown, and the union bound holds under any.
  So when every arm's interim values are distributed like the baseline's, the chance that any arm is stopped at
  any look is at most alpha. (The final verdicts are two-sided: their alpha covers "better" and "worse" together.
  A stop makes only the one claim, so that claim is held to the whole alpha.)
- What is claimed is "worse at step N", not at the end: an arm that learns slowly but ends better can be stopped.
  Stopped arms are left out of the final verdicts (and of their Holm family) and reported apart.

Halving (`halving: {grace_steps, reduction_factor}`, asynchronous successive halving as in ASHA): rungs at
grace_steps * reduction_factor^k steps (before the shortest arm's last step; each must be an evaluation step of
every arm). When every seed of an arm has reached a rung, its value there is the mean over its seeds of the
primary metric at that step; among the arms that have reached the rung so far (this one included, the baseline
never ranked nor stopped), it goes on only if it ranks within the best ceil(k / reduction_factor) of those k;
otherwise it is stopped "by halving" (a ranking, not a verdict: it is not called worse). As in ASHA the first
arm at a rung always goes on, and which arms are cut depends on the order they arrive in.

Every look and rung is a ledger event (`early_stop.look`, `early_stop.rung`, per arm), and every stopped arm an
`early_stop.stop` event with its reason and numbers; the scheduler stops the arm's attempts through their stop
events (the trainers checkpoint on SIGTERM) and ends its arm runs `cancelled` with that reason. An arm whose
runs have all ended is not stopped (there is nothing left to save): it keeps its final verdict. A resumed run
reads the events back, so it neither repeats a look nor restarts a stopped arm.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from scipy import stats

from orchestrator.cost import decisions
from orchestrator.ledger import FINAL_STATES, Ledger
from orchestrator.report.verdicts import ALPHA, compare_to_baseline

BOUNDARIES = ("bonferroni", "obrien-fleming")
STOP_EVENT = decisions.STOPPED_EARLY


def look_alphas(fractions: list[float], alpha: float = ALPHA, boundary: str = "bonferroni") -> list[float]:
    """The alpha each planned look is tested at; `fractions` are the looks' steps over the training length (in
    (0, 1], increasing). Their sum is at most `alpha`, so by the union bound the chance of any false stop over
    all looks is at most alpha whatever the dependence between looks."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    if not fractions:
        return []
    if any(not 0 < t <= 1 for t in fractions) or sorted(fractions) != list(fractions):
        raise ValueError(f"look fractions must increase within (0, 1], got {fractions}")
    if boundary == "bonferroni":
        return [alpha / len(fractions)] * len(fractions)
    z = stats.norm.ppf(1 - alpha / 2)
    spent = [0.0] + [float(2 - 2 * stats.norm.cdf(z / math.sqrt(t))) for t in fractions]
    return [later - earlier for earlier, later in zip(spent, spent[1:])]


def look_alpha(alpha_k: float, compared: int) -> float:
    """The alpha one arm is tested at in a look whose alpha is `alpha_k`: split over the `compared` arms compared
    with the baseline (Bonferroni over arms)."""
    return alpha_k / max(compared, 1)


def evaluation_steps(configs: list[dict], after_step: int = 1) -> list[int]:
    """Steps at or after `after_step` (and after 0) at which every config evaluates, before the shortest one
    ends."""
    every = math.lcm(*(int(c["eval_every"]) for c in configs))
    last = min(int(c["steps"]) for c in configs)
    first = max(after_step, 1)
    return [s for s in range(every, last, every) if s >= first]


def planned_looks(configs: list[dict], after_step: int, looks: int) -> list[int]:
    """The interim looks: at most `looks` shared evaluation steps, each the first at or after k/(looks+1) of the
    shortest arm's training (k = 1..looks)."""
    candidates = evaluation_steps(configs, after_step)
    last = min(int(c["steps"]) for c in configs)
    chosen = []
    for k in range(1, looks + 1):
        step = next((s for s in candidates if s >= last * k / (looks + 1)), None)
        if step is not None and step not in chosen:
            chosen.append(step)
    return chosen


def decided_looks(configs: list[dict], settings) -> tuple[list[int], list[float]]:
    """`decided`'s planned looks for these arm configs and the spec's EarlyStopping `settings`, with the alpha
    each look is tested at (before the split over arms, `look_alpha`): the study's alpha spent by `boundary` at
    the looks' fractions of the shortest arm's training."""
    looks = planned_looks(configs, settings.after_step, settings.looks)
    last = min(int(c["steps"]) for c in configs)
    return looks, look_alphas([s / last for s in looks], ALPHA, settings.boundary)


def halving_rungs(configs: list[dict], grace_steps: int, reduction_factor: int) -> list[int]:
    """grace_steps * reduction_factor^k, for k = 0, 1, ... while before the shortest arm's last step."""
    last = min(int(c["steps"]) for c in configs)
    rungs, step = [], grace_steps
    while step < last:
        rungs.append(step)
        step *= reduction_factor
    return rungs


def rung_keeps(value: float | None, earlier: list[float | None], mode: str,
               reduction_factor: int) -> tuple[bool, int, int]:
    """Asynchronous successive halving at one rung: does an arm with `value` go on, given the values of the arms
    that reached the rung before it? Returns (goes on, its rank among the k arms there, k). Arms without a value
    rank last; a tie ranks the newcomer after the earlier arms."""
    sign = 1 if mode == "min" else -1
    better_first = [sign * v for v in earlier if v is not None]
    if value is None:
        rank = len(earlier) + 1
    else:
        rank = 1 + sum(1 for v in better_first if v <= sign * value)
    k = len(earlier) + 1
    return rank <= math.ceil(k / reduction_factor), rank, k


def worse_than_baseline(values: dict[str, dict[int, float]], arm: str, baseline: str, mode: str,
                        alpha: float):
    """One arm at one interim look, with the study's statistics: its Verdict against the baseline (the paired
    t-test of compare_to_baseline; with one arm Holm changes nothing), read one-sided for the claim a stop makes.
    `p_value` and `p_adjusted` are the one-sided p of "worse than the baseline" (half the two-sided p on the worse
    side, one minus that on the better side); `verdict` is "worse" when it is below `alpha`, else "inconclusive"."""
    verdict = compare_to_baseline({baseline: values.get(baseline, {}), arm: values.get(arm, {})}, baseline, mode,
                                  alpha=alpha)[arm]
    if verdict.p_value is None:
        verdict.verdict = "inconclusive"
        return verdict
    worse_side = verdict.diff_mean != 0 and (verdict.diff_mean > 0) == (mode == "min")
    one_sided = verdict.p_value / 2 if worse_side else 1 - verdict.p_value / 2
    verdict.p_value = verdict.p_adjusted = one_sided
    verdict.verdict = "worse" if one_sided < alpha else "inconclusive"
    return verdict


@dataclass
class Decision:
    arm: str
    rule: str          # "worse" or "halving"
    step: int
    reason: str        # as the arm runs' reason and the report show it
    why: str           # the numbers behind it, quoted in results.md


def stop_reason(rule: str, step: int) -> str:
    return f"stopped early: worse at step {step}" if rule == "worse" else f"stopped by halving at step {step}"


def stopped_arms(ledger: Ledger, run_id: str) -> dict[str, dict]:
    """Arm -> the detail of its `early_stop.stop` event (arm, rule, step, reason, why), from the ledger."""
    found = {}
    for event in ledger.events(run_id, STOP_EVENT):
        detail = json.loads(event["detail_json"] or "{}")
        found.setdefault(detail["arm"], detail)
    return found


@dataclass
class EarlyStopper:
    """Takes each arm's planned looks and rungs as it reaches them; remembers them in the ledger."""
    ledger: Ledger
    run_id: str
    metric: str
    mode: str
    baseline: str | None
    looks: list[int] = field(default_factory=list)          # decided: planned interim looks
    alphas: list[float] = field(default_factory=list)       # and the alpha each is tested at (before the arms)
    boundary: str = "bonferroni"
    rungs: list[int] = field(default_factory=list)          # halving
    reduction_factor: int = 2
    stopped: dict[str, str] = field(default_factory=dict)   # arm -> reason
    taken: set[tuple[str, int, str]] = field(default_factory=set)    # ("look" | "rung", step, arm) done
    at_rung: dict[int, list] = field(default_factory=dict)  # rung step -> values of the arms that reached it

    @classmethod
    def for_run(cls, ledger: Ledger, run_id: str, settings, metric: str, mode: str,
                baseline: str | None) -> "EarlyStopper | None":
        """None when `settings` (the spec's EarlyStopping) asks for neither rule."""
        if not settings.decided and settings.halving is None:
            return None
        configs = [json.loads(r["config_json"]) for r in ledger.arm_runs(run_id, kind="arm")]
        stopper = cls(ledger, run_id, metric, mode, baseline, boundary=settings.boundary)
        if settings.decided and baseline is not None:
            stopper.looks, stopper.alphas = decided_looks(configs, settings)
        if settings.halving is not None:
            stopper.reduction_factor = settings.halving.reduction_factor
            stopper.rungs = halving_rungs(configs, settings.halving.grace_steps, settings.halving.reduction_factor)
        stopper.stopped = {arm: d["reason"] for arm, d in stopped_arms(ledger, run_id).items()}
        for event in ledger.events(run_id, "early_stop."):
            detail = json.loads(event["detail_json"] or "{}")
            if event["kind"] in ("early_stop.look", "early_stop.rung"):
                kind = event["kind"].split(".")[1]
                stopper.taken.add((kind, int(detail["step"]), detail["arm"]))
                if kind == "rung":
                    stopper.at_rung.setdefault(int(detail["step"]), []).append(detail["mean"])
        return stopper

    def check(self, arm_runs: list[dict]) -> list[Decision]:
        """Take the looks and rungs that arms have reached since the last call; returns the new stops (already
        in the ledger and in `stopped`)."""
        by_arm: dict[str, list[dict]] = {}
        for row in arm_runs:
            if row["kind"] == "arm":
                by_arm.setdefault(row["arm"], []).append(row)
        compared = sum(1 for arm in by_arm if arm != self.baseline)
        decisions = []
        for arm, rows in by_arm.items():
            if arm == self.baseline:
                continue
            due = sorted([(s, "look") for s in self.looks] + [(s, "rung") for s in self.rungs])
            for step, kind in due:
                if arm in self.stopped:
                    break
                if (kind, step, arm) in self.taken:
                    continue
                needed = rows + (by_arm.get(self.baseline, []) if kind == "look" else [])
                if not all(r["state"] in FINAL_STATES or (r["last_step"] or 0) >= step for r in needed):
                    break           # its later looks are not reached either
                self.taken.add((kind, step, arm))
                decision = self._look(needed, arm, step, compared) if kind == "look" else self._rung(rows, arm, step)
                if decision is not None and any(r["state"] not in FINAL_STATES for r in rows):
                    self.stopped[arm] = decision.reason
                    self.ledger.event(self.run_id, STOP_EVENT, arm=arm, rule=decision.rule, step=step,
                                      reason=decision.reason, why=decision.why)
                    decisions.append(decision)
        return decisions

    def _values_at(self, arm_runs: list[dict], step: int) -> dict[str, dict[int, float]]:
        """Arm -> seed -> the primary metric logged at `step` (seeds without a finite value there left out)."""
        values: dict[str, dict[int, float]] = {}
        for row in arm_runs:
            values.setdefault(row["arm"], {})
            logged = next((m for m in self.ledger.metric_rows(row["id"]) if m["step"] == step), {})
            value = logged.get(self.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[row["arm"]][row["seed"]] = float(value)
        return values

    def _look(self, arm_runs: list[dict], arm: str, step: int, compared: int) -> Decision | None:
        index = self.looks.index(step)
        alpha = look_alpha(self.alphas[index], compared)
        verdict = worse_than_baseline(self._values_at(arm_runs, step), arm, self.baseline, self.mode, alpha)
        self.ledger.event(self.run_id, "early_stop.look", arm=arm, step=step, look=index + 1, of=len(self.looks),
                          alpha=alpha, boundary=self.boundary, n=verdict.n, diff_mean=verdict.diff_mean,
                          p_one_sided=verdict.p_value, verdict=verdict.verdict)
        if verdict.verdict != "worse":
            return None
        why = (f"{self.metric} at step {step}: mean difference {verdict.diff_mean:+.4g} from {self.baseline} on "
               f"{verdict.n} paired seeds, paired t-test p {verdict.p_value:.3g} (one-sided, worse) < {alpha:.3g}: "
               f"the alpha of look {index + 1} of {len(self.looks)} ({self.boundary} over the planned looks at steps "
               f"{', '.join(map(str, self.looks))}) split over {compared} arm{'s' if compared != 1 else ''}")
        return Decision(arm, "worse", step, stop_reason("worse", step), why)

    def _rung(self, arm_runs: list[dict], arm: str, step: int) -> Decision | None:
        seeds = self._values_at(arm_runs, step)[arm]
        mean = sum(seeds.values()) / len(seeds) if seeds else None
        earlier = self.at_rung.setdefault(step, [])
        goes_on, rank, k = rung_keeps(mean, earlier, self.mode, self.reduction_factor)
        earlier.append(mean)
        self.ledger.event(self.run_id, "early_stop.rung", arm=arm, step=step, mean=mean, rank=rank, of=k,
                          goes_on=goes_on, reduction_factor=self.reduction_factor)
        if goes_on:
            return None
        shown = "no value" if mean is None else f"{mean:.4g}"
        why = (f"mean {self.metric} at step {step} over {len(seeds)} seeds {shown}: rank {rank} of the {k} arms "
               f"that reached this rung so far; the best ceil({k}/{self.reduction_factor}) = "
               f"{math.ceil(k / self.reduction_factor)} go on")
        return Decision(arm, "halving", step, stop_reason("halving", step), why)


def plan_problem(settings, configs: dict[str, dict], baseline: str | None) -> tuple[tuple, str] | None:
    """What is wrong with `early_stop` for these arm configs (arm -> config), as (where in the spec, message);
    None when nothing is. Checked when the spec is loaded, before anything runs."""
    if settings.decided:
        if baseline is None or len(configs) < 2:
            return ("decided",), ("decided: true stops arms shown worse than the baseline: it needs a `baseline:` "
                                  "and at least one other arm")
        if not planned_looks(list(configs.values()), settings.after_step, settings.looks):
            every = ", ".join(f"{arm} every {c['eval_every']} of {c['steps']} steps" for arm, c in configs.items())
            return ("decided",), (f"no evaluation step that every arm shares lies at or after after_step "
                                  f"{settings.after_step} and before the last step (arms evaluate: {every}); "
                                  f"an interim look needs one")
    if settings.halving is not None:
        rungs = halving_rungs(list(configs.values()), settings.halving.grace_steps, settings.halving.reduction_factor)
        if not rungs:
            return ("halving", "grace_steps"), (f"grace_steps {settings.halving.grace_steps} is not before the "
                                                f"shortest arm's last step: there is no rung")
        for arm, config in configs.items():
            off = [s for s in rungs if s % int(config["eval_every"])]
            if off:
                return ("halving",), (f"rungs at steps {rungs}: arm {arm!r} does not evaluate at step {off[0]} "
                                      f"(eval_every {config['eval_every']}); choose grace_steps and "
                                      f"reduction_factor so that every rung is a multiple of every arm's eval_every")
    return None
