"""results.md: the answer first, then what ran, the results table, upstream runs, the plots and notes."""

from __future__ import annotations

import time

from orchestrator.report.collect import BROKEN_STATES, ArmResult, SeedResult, StudyResults, one_line
from orchestrator.report.plots import PlotOutcome
from orchestrator.report.table import (format_diff, format_hours, format_number, format_p, format_signed,
                                       markdown_table, numeric_columns, seeds_compared, state_counts, table_columns,
                                       table_legend)
from orchestrator.report.verdicts import ALPHA, CONFIDENCE

DIRECTION_WORDS = {"min": "lower is better", "max": "higher is better"}
PER_SEED_MAX_N = 3   # with this many seeds or fewer, results.md lists every seed's primary metric
VERDICT_GROUPS = (("better", "Better"), ("worse", "Worse"), ("inconclusive", "Inconclusive"))


def answer_lines(results: StudyResults) -> list[str]:
    """The study's answer in a few plain lines: which arms are better, worse or undecided, and by how much."""
    if not results.arms:
        return ["No arm runs: nothing to compare."]
    stopped = [arm for arm in results.arms if arm.stopped is not None]
    stopped_line = ["Stopped early (no final verdict): " + "; ".join(f"{arm.name} ({arm.stopped['reason']})"
                                                                    for arm in stopped)] if stopped else []
    compared = [arm for arm in results.arms if arm.verdict is not None and not arm.is_baseline]
    if not compared:
        return [f"No verdicts: {_why_no_verdicts(results)}."] + stopped_line
    if all(arm.verdict.n < 2 for arm in compared):
        return ["One seed per arm: nothing can be concluded; run with seeds >= 3."] + stopped_line
    tested = sum(1 for arm in compared if arm.verdict.p_value is not None)
    lines = [f"{results.primary} ({DIRECTION_WORDS[results.mode]}), each arm against {results.baseline} on "
             f"paired seeds: mean difference with its {CONFIDENCE:.0%} t interval, wins, n, "
             f"p Holm-adjusted over {tested} arm{'s' if tested != 1 else ''}; decided where p < {ALPHA}."]
    if results.primary_caveat:
        lines.append(f"Caution: {results.primary_caveat}.")
    for verdict, label in VERDICT_GROUPS:
        arms = [arm for arm in compared if arm.verdict.verdict == verdict]
        lines.append(f"{label}: " + ("; ".join(_answer_item(arm) for arm in arms) if arms else "none"))
    return lines + stopped_line


def _answer_item(arm: ArmResult) -> str:
    v = arm.verdict
    text = f"{arm.name} {format_diff(v)}, wins {v.wins_text}, n={v.n}"
    if v.p_adjusted is not None:
        p = format_p(v.p_adjusted)
        text += f", p{p}" if p.startswith("<") else f", p={p}"
    return text + (f" ({v.note})" if v.note else "")


def _why_no_verdicts(results: StudyResults) -> str:
    if not results.baseline:
        return "the spec names no baseline arm"
    if not results.primary:
        return "the spec names no primary metric"
    if not any(arm.is_baseline for arm in results.arms):
        return f"the baseline {results.baseline} is not an arm of this run"
    if results.mode not in DIRECTION_WORDS:
        return f"the direction of {results.primary} is unknown"
    if len(results.arms) < 2:
        return "the baseline is the only arm"
    if all(arm.stopped is not None for arm in results.arms if not arm.is_baseline):
        return "every other arm was stopped early"
    return f"the baseline {results.baseline} has no succeeded seed with {results.primary}"


def results_markdown(results: StudyResults, plots: list[PlotOutcome]) -> str:
    run = results.run
    lines = [f"# {run['name']}: results", ""]
    answer = answer_lines(results)
    lines += [f"**{answer[0]}**", ""] + [f"- {line}" for line in answer[1:]] + ([""] if answer[1:] else [])

    lines += [f"- Run: `{run['run_id']}` ({run['state']}, backend {run['backend']})",
              f"- Trainer: `{run['trainer']}`",
              f"- Code: {_code_line(run)}"]
    if results.primary:
        direction = DIRECTION_WORDS.get(results.mode or "", "direction unknown")
        lines.append(f"- Primary metric: `{results.primary}` ({direction})")
    if results.baseline:
        lines.append(f"- Baseline arm: `{results.baseline}`")
    lines += _seed_lines(results)
    lines.append(f"- Report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if results.description.strip():
        lines += ["", results.description.strip()]
    described = [arm for arm in results.arms if arm.description.strip()]
    if described:
        lines += [""] + [f"- `{arm.name}`: {arm.description.strip()}" for arm in described]

    lines += ["", "## Arms", ""]
    if results.arms:
        headers, rows = table_columns(results)
        lines += [markdown_table(headers, rows, numeric_columns(headers)), "", table_legend(results)]
        lines += _per_seed_section(results)
    else:
        lines.append("This run has no arm runs.")
    if results.hardware_warning:
        lines += ["", f"> **Warning:** {results.hardware_warning}"]

    lines += _stopped_section(results)
    lines += _upstream_section(results)

    lines += ["", "## Plots", ""]
    lines += [f"Every metric of every arm and seed against the step, the sample grids over time and each arm's "
              f"changed settings (HParams) are in TensorBoard: `make tensorboard RUN={run['run_id']}`, or "
              f"`tensorboard --logdir` on this run's [tensorboard/](tensorboard/) folder.", ""]
    for plot in plots:
        if plot.path is not None:
            lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.path.name})", ""]
    skipped = [f"- {plot.title}: not drawn, {plot.skipped_because}." for plot in plots if plot.path is None]
    lines += skipped + [""] if skipped else []

    lines += ["## Notes", ""]
    if results.notes:
        lines += [f"- {note}" for note in results.notes]
    else:
        lines.append("- Every arm run succeeded." if results.seeds else "- Nothing has been planned in this run.")
    return "\n".join(lines).rstrip() + "\n"


def _seed_lines(results: StudyResults) -> list[str]:
    lines = []
    several = len(results.seed_randomises) > 1
    for trainer, randomised in results.seed_randomises.items():
        lines.append(f"- Each seed randomises{f' ({trainer})' if several else ''}: {', '.join(randomised)}")
    counts = {arm.name: seeds_compared(results, arm) for arm in results.arms}
    if len(set(counts.values())) > 1 or results.seed_rounds:
        listing = ", ".join(f"`{name}` {n}" for name, n in counts.items())
        lines.append(f"- Seeds per arm: {listing} (n compared; a seed that did not succeed is left out, and "
                     f"adaptive seeds are added only to arms whose verdict is still open)")
        lines += [f"  - {reason}" for reason in results.seed_rounds]
    return lines


def _per_seed_section(results: StudyResults) -> list[str]:
    """Every seed's primary metric (and its difference from the baseline's), when there are few seeds."""
    if not results.primary or not any(0 < seeds_compared(results, arm) <= PER_SEED_MAX_N for arm in results.arms):
        return []
    seeds = sorted({s.row["seed"] for arm in results.arms for s in arm.seeds})
    baseline = next((arm for arm in results.arms if arm.is_baseline), None)
    reference = baseline.primary_values(results.primary) if baseline is not None else {}
    rows = []
    for arm in results.arms:
        by_seed = {s.row["seed"]: s for s in arm.seeds}
        values = arm.primary_values(results.primary)
        cells = [arm.name]
        for seed in seeds:
            if seed in values:
                cell = format_number(values[seed])
                if not arm.is_baseline and seed in reference:
                    cell += f" ({format_signed(values[seed] - reference[seed])})"
            elif seed in by_seed and by_seed[seed].state in BROKEN_STATES:
                cell = by_seed[seed].state
            else:
                cell = "—"
            cells.append(cell)
        rows.append(cells)
    headers = ["Arm"] + [f"seed {seed}" for seed in seeds]
    return ["", f"### {results.primary} per seed", "",
            markdown_table(headers, rows, range(1, len(headers))), "",
            f"In brackets: the difference from {results.baseline} on the same seed." if reference else ""]


def _stopped_section(results: StudyResults) -> list[str]:
    """The arms stopped at an interim look, each with its `early_stop.stop` ledger event quoted."""
    stopped = [arm for arm in results.arms if arm.stopped is not None]
    if not stopped:
        return []
    lines = ["", "## Stopped early", "",
             "These arms were stopped at an interim look and are left out of the verdicts above (rules: "
             "orchestrator/early_stop.py). Their decisions, as the ledger's `early_stop.stop` events hold them:", ""]
    for arm in stopped:
        lines += [f"> **{arm.name}**: {arm.stopped['reason']}. {arm.stopped['why']}", ""]
    return lines[:-1]


def _upstream_section(results: StudyResults) -> list[str]:
    if not results.upstream:
        return []
    lines = ["", "## Upstream runs", "",
             "Their own summaries, per seed: read the arms' results beside them (e.g. a tokenizer's codebook "
             "usage). Used by: the arms that consumed each run."]
    all_arms = [arm.name for arm in results.arms]
    for trainer, metrics in results.upstream_metrics.items():
        seeds = [s for s in results.upstream if s.row["trainer"] == trainer]
        shown = [m for m in metrics if any(m in s.values for s in seeds)]
        with_reason = any(s.row["reason"] for s in seeds)
        headers = (["Upstream", "Used by", "Seed", "State"] + shown + ["Compute", "Hardware"]
                   + (["Reason"] if with_reason else []))
        rows = []
        for seed in seeds:
            users = results.upstream_users.get(seed.row["id"], [])
            used_by = "all arms" if users and len(all_arms) > 1 and users == all_arms else ", ".join(users) or "—"
            cells = [seed.row["arm"], used_by, str(seed.row["seed"]), state_counts([seed])]
            cells += [format_number(seed.values[m]) if m in seed.values else "—" for m in shown]
            cells += [_compute(seed), ", ".join(seed.hardware) or "—"]
            if with_reason:
                cells.append(one_line(seed.row["reason"]) if seed.row["reason"] else "")
            rows.append(cells)
        right = set(range(4, 4 + len(shown))) | {2}
        lines += ["", f"### {trainer}", "", markdown_table(headers, rows, right)]
    return lines


def _compute(seed: SeedResult) -> str:
    return f"{format_hours(seed.gpu_hours)} GPU-h" if seed.row["gpus"] else f"{format_hours(seed.cpu_hours)} CPU-h"


def _code_line(run: dict) -> str:
    if not run["git_commit"]:
        return "git commit unknown"
    line = f"git commit `{run['git_commit']}`"
    if run["git_diff_hash"]:
        line += f" with uncommitted changes (diff hash `{run['git_diff_hash']}`)"
    return line
