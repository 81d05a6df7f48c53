"""Is an arm better than the baseline? A paired comparison over seeds, with the arms' p-values Holm-adjusted.

Seed k of every arm shares its data draw, initialisation stream and upstream runs, so an arm is compared to the
baseline seed by seed: d_k = arm_k - baseline_k (raw units of the metric), over the seeds both have.

- diff_mean: the mean of d_k.
- ci_low, ci_high: the 95% Student t interval of that mean, mean ± t(0.975, n-1) · sd(d) / sqrt(n). This is the
  interval printed. With n >= BOOTSTRAP_MIN_SEEDS a BCa bootstrap interval of the mean is computed as well
  (bca_low, bca_high; a fixed random stream, so a report rewritten from the same numbers does not change).
- p_value: the two-sided paired t-test (a one-sample t-test of d against 0); p_adjusted: Holm's step-down
  adjustment over the arms that have a p-value, which keeps the chance of any false "better"/"worse" among
  them at alpha or below.
- verdict: "better" or "worse" when p_adjusted < alpha, by the sign of diff_mean and the metric's direction;
  else "inconclusive"; "baseline" for the baseline.
- wins: seeds where the arm beats the baseline in the metric's direction (ties are not wins).

Edge cases: fewer than two paired seeds has no test (inconclusive). Differences that are all the same have no
spread, so the t statistic is infinite: all zero is inconclusive (no difference seen); the same nonzero
difference on every seed counts as p = 0 only with at least IDENTICAL_MIN_SEEDS seeds (a deterministic shift
seen on 3+ independent replicates), and stays inconclusive with 2.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

VERDICTS = ("baseline", "better", "worse", "inconclusive")
ALPHA = 0.05
BOOTSTRAP_MIN_SEEDS = 10
IDENTICAL_MIN_SEEDS = 3
CONFIDENCE = 0.95
ONE_SEED_NOTE = "one seed: nothing can be concluded"
# Differences smaller than this fraction of the values' magnitude are rounding noise, not spread.
RELATIVE_TOLERANCE = 1e-12


@dataclass
class Verdict:
    arm: str
    n: int                                   # paired seeds compared (for the baseline: its seeds with a value)
    diff_mean: float | None                  # mean of arm - baseline over paired seeds, raw units
    ci_low: float | None                     # 95% Student t interval of diff_mean
    ci_high: float | None
    p_value: float | None                    # two-sided paired t-test
    p_adjusted: float | None                 # Holm-adjusted over the arms that have a p_value
    wins: int                                # seeds where the arm beats the baseline
    verdict: str                             # one of VERDICTS
    per_seed: list[tuple[int, float, float]] = field(default_factory=list)   # (seed, arm value, baseline value)
    note: str = ""
    bca_low: float | None = None             # BCa bootstrap interval of diff_mean (n >= BOOTSTRAP_MIN_SEEDS)
    bca_high: float | None = None

    @property
    def wins_text(self) -> str:
        return f"{self.wins}/{self.n}"


def compare_to_baseline(values: dict[str, dict[int, float]], baseline: str, mode: str,
                        alpha: float = ALPHA) -> dict[str, Verdict]:
    """A Verdict per arm of `values` (arm -> seed -> primary metric of its succeeded seeds), in its order.
    `mode` is the metric's direction: "min" (lower is better) or "max"."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {sorted(values)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    reference = values[baseline]
    verdicts = {}
    for arm, by_seed in values.items():
        if arm == baseline:
            verdicts[arm] = Verdict(arm, len(reference), None, None, None, None, None, 0, "baseline",
                                    [(s, v, v) for s, v in sorted(reference.items())])
        else:
            verdicts[arm] = _paired(arm, by_seed, reference, baseline, mode)
    adjusted = holm({arm: v.p_value for arm, v in verdicts.items() if v.p_value is not None})
    for arm, p_adjusted in adjusted.items():
        verdict = verdicts[arm]
        verdict.p_adjusted = p_adjusted
        if p_adjusted < alpha:
            lower = verdict.diff_mean < 0
            verdict.verdict = "better" if lower == (mode == "min") else "worse"
    return verdicts


def check_guards(verdicts: dict[str, Verdict], primary: str, flattered_by: str,
                 guards: dict[str, tuple[str, dict[str, dict[int, float]]]], baseline: str,
                 alpha: float = ALPHA) -> None:
    """Demote to "inconclusive" an arm called better on a primary metric that a degenerate model can flatter (what
    flatters it: `flattered_by`) when a guard metric shows it worse than the baseline. `guards`: guard metric ->
    (its mode, arm -> seed -> value). Each guard is the same paired t-test, two-sided, not Holm-adjusted: it
    checks one claim, and erring there costs a "better", never a false one."""
    for arm, verdict in verdicts.items():
        if verdict.verdict != "better":
            continue
        for guard, (mode, values) in guards.items():
            if not values.get(arm) or not values.get(baseline):
                verdict.note = _joined(verdict.note, f"not checked against {guard}: not reported")
                continue
            check = compare_to_baseline({baseline: values[baseline], arm: values[arm]}, baseline, mode, alpha)[arm]
            if check.verdict == "worse":
                verdict.verdict = "inconclusive"
                verdict.note = _joined(f"better on {primary} but worse on {guard} ({check.diff_mean:+.3g}, "
                                       f"p={check.p_value:.2g}, n={check.n}), and {primary} is flattered by "
                                       f"{flattered_by}", verdict.note)
                break


def _joined(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values becomes max over j <= i of (m - j + 1) p_(j),
    capped at 1. Rejecting where the adjusted p < alpha keeps the family-wise error rate at alpha or below."""
    m = len(p_values)
    adjusted, running_max = {}, 0.0
    for rank, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        running_max = max(running_max, min(1.0, (m - rank) * p))
        adjusted[name] = running_max
    return {name: adjusted[name] for name in p_values}


def _paired(arm: str, by_seed: dict[int, float], reference: dict[int, float], baseline: str, mode: str) -> Verdict:
    seeds = sorted(set(by_seed) & set(reference))
    per_seed = [(s, by_seed[s], reference[s]) for s in seeds]
    diffs = np.array([a - b for _, a, b in per_seed])
    n = len(seeds)
    notes = _unpaired_notes(arm, by_seed, reference, baseline)
    beats = (lambda d: d < 0) if mode == "min" else (lambda d: d > 0)
    wins = sum(1 for d in diffs if beats(d))
    verdict = Verdict(arm, n, float(diffs.mean()) if n else None, None, None, None, None, wins, "inconclusive",
                      per_seed)
    if n < 2:
        notes.append(ONE_SEED_NOTE if n == 1 else "no seed paired with the baseline: nothing can be compared")
        verdict.note = "; ".join(notes)
        return verdict

    scale = max(abs(v) for _, a, b in per_seed for v in (a, b)) or 1.0
    if float(np.ptp(diffs)) <= RELATIVE_TOLERANCE * scale:   # the same difference on every seed: no spread
        verdict.ci_low = verdict.ci_high = verdict.diff_mean
        if abs(verdict.diff_mean) <= RELATIVE_TOLERANCE * scale:
            verdict.diff_mean = verdict.ci_low = verdict.ci_high = 0.0
            notes.append(f"identical to {baseline} on every seed")
        elif n >= IDENTICAL_MIN_SEEDS:
            verdict.p_value = 0.0
            notes.append("the same difference on every seed (no spread): counted as p = 0")
        else:
            notes.append(f"the same difference on both seeds (no spread): needs {IDENTICAL_MIN_SEEDS} seeds to decide")
        verdict.note = "; ".join(notes)
        return verdict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # nearly equal differences: the test still holds
        test = stats.ttest_1samp(diffs, 0.0)
        interval = test.confidence_interval(CONFIDENCE)
    verdict.p_value = float(test.pvalue)
    verdict.ci_low, verdict.ci_high = float(interval.low), float(interval.high)
    if n >= BOOTSTRAP_MIN_SEEDS:
        verdict.bca_low, verdict.bca_high = _bca_interval(diffs)
    verdict.note = "; ".join(notes)
    return verdict


def _bca_interval(diffs: np.ndarray) -> tuple[float | None, float | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a degenerate resample distribution gives nan bounds, not an error
        result = stats.bootstrap((diffs,), np.mean, confidence_level=CONFIDENCE, method="BCa",
                                 rng=np.random.default_rng(0))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else (None, None)


def _unpaired_notes(arm: str, by_seed: dict[int, float], reference: dict[int, float], baseline: str) -> list[str]:
    notes = []
    for owner, other, seeds in ((arm, baseline, set(by_seed) - set(reference)),
                                (baseline, arm, set(reference) - set(by_seed))):
        if seeds:
            listed = ", ".join(str(s) for s in sorted(seeds))
            notes.append(f"seed{'s' if len(seeds) > 1 else ''} {listed} of {owner} left out "
                         f"({other} has no value there)")
    return notes
