"""Print the expanded plan of a spec (arms x seeds, what each arm changes, resources, cost estimate)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.backends.provision import capabilities
from orchestrator.cost.estimate import Estimate, estimate_study, local_dollars_per_hour, record_estimate
from orchestrator.early_stop import decided_looks, halving_rungs, look_alpha
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger
from orchestrator.report.verdicts import ALPHA
from orchestrator.spec import Plan, PlannedUpstream, flatten
from orchestrator.trainer_registry import metric_caveat


def arm_changes(plan: Plan) -> dict[str, str]:
    """What each arm sets on top of `base`, as 'key=value' text."""
    study = plan.study
    changes = {}
    for run in plan.arm_runs:
        if run.arm in changes:
            continue
        arm = next((a for a in study.arms if run.arm == a.name or run.arm.startswith(a.name + "@")), None)
        flat = flatten(arm.set) if arm else {}
        for key in study.grid:
            flat[key] = _lookup(run.config, key)
        changes[run.arm] = ", ".join(f"{k}={v}" for k, v in flat.items()) or "(base)"
    return changes


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def estimate(plan: Plan, gpus: float, n_arm_runs: int | None = None) -> Estimate | None:
    """The cost of the planned arm runs (or of `n_arm_runs`, e.g. an adaptive study at its maximum)."""
    study = plan.study
    hours = study.budget.expected_hours_per_arm
    n_arm_runs = len(plan.arm_runs) if n_arm_runs is None else n_arm_runs
    if hours is None:
        return None
    if capabilities(study.backend).bills:          # priced at the provider's cap; else energy at home
        price = getattr(study, study.backend).get("max_dollars_per_hour")
        if price is None:
            return None
        return estimate_study(n_arm_runs, hours, float(price), gpus)
    return estimate_study(n_arm_runs, hours, local_dollars_per_hour(gpus), gpus)


def _needs(upstreams: dict[str, PlannedUpstream], up: PlannedUpstream) -> bool:
    """Does a run with these upstream runs need `up`, directly or through another upstream run?"""
    return any(u is up or _needs(u.upstream, up) for u in upstreams.values())


def seed_lines(plan: Plan) -> list[str]:
    """What a replicate varies, and the upstream runs of each seed with the arms that share them."""
    study = plan.study
    lines = ["each seed k trains every arm and every upstream run it needs with seed=k and data.draw=k "
             "(paired: seed k of every arm shares them)"]
    trainers = {info.name: info for info in [plan.trainer, *plan.trainers.values()]}
    for info in trainers.values():
        if info.seed_randomises:
            owner = f" ({info.name})" if len(trainers) > 1 else ""
            lines.append(f"each seed randomises{owner}: {', '.join(info.seed_randomises)}")
    for seed in sorted({up.seed for up in plan.upstreams}):
        for up in (u for u in plan.upstreams if u.seed == seed):
            users = sorted({r.arm for r in plan.arm_runs if _needs(r.upstream, up)})
            lines.append(f"seed {seed}: upstream {up.name}: one {up.trainer} run shared by {', '.join(users)}")
    if study.adaptive:
        lines.append(f"seeds: {study.seeds.min}, up to {study.seeds.max} where the verdict is open "
                     f"(one seed per round, for the open arms and the baseline; later seeds' upstream runs "
                     f"are planned the same way)")
    return lines


def _numbers(values) -> str:
    return ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)


def early_stop_lines(plan: Plan) -> list[str]:
    """The study's early stopping as the scheduler will apply it (orchestrator/early_stop.py, computed by the same
    functions as EarlyStopper.for_run): the interim looks and the alpha each spends, the halving rungs, the bound
    rules. No lines when `early_stop` is not set."""
    study = plan.study
    settings = study.early_stop
    configs = [run.config for run in plan.arm_runs]
    lines = []
    if settings.decided and study.baseline is not None:
        looks, alphas = decided_looks(configs, settings)
        last = min(int(c["steps"]) for c in configs)
        compared = len({run.arm for run in plan.arm_runs} - {study.baseline})
        per_arm = _numbers(look_alpha(a, compared) for a in alphas)
        tested = (f"the one arm compared with {study.baseline} is tested at the look's alpha" if compared == 1 else
                  f"each of the {compared} arms compared with {study.baseline} is tested at the look's alpha / "
                  f"{compared} = {per_arm} (Bonferroni over arms)")
        lines.append(f"early stop (decided): looks at steps {_numbers(looks)} of {last}; alpha per look "
                     f"{_numbers(alphas)} ({settings.boundary} over the looks), total {sum(alphas):.3g} of the "
                     f"study's alpha {ALPHA:g}; {tested}; an arm is stopped when worse than {study.baseline} at a "
                     f"look by the study's paired t-test on {study.metric.name} at that step, one-sided (a stop claims "
                     f"only worse)")
    if settings.halving is not None:
        factor = settings.halving.reduction_factor
        rungs = halving_rungs(configs, settings.halving.grace_steps, factor)
        lines.append(f"early stop (halving): rungs at steps {_numbers(rungs)}; keep the best 1/{factor} at each "
                     f"rung: an arm goes on when its mean {study.metric.name} ranks within the best ceil(k/{factor}) "
                     f"of the k arms that reached the rung so far (the first always goes on; "
                     f"{study.baseline or 'the baseline'} is never ranked)")
    for rule in settings.rules:
        bound = " or ".join(f"{word} {value:g}" for word, value in (("above", rule.above), ("below", rule.below))
                            if value is not None)
        lines.append(f"early stop (bound): an arm run stops when {rule.metric} is {bound} at or after step "
                     f"{rule.after_step}")
    return lines


def print_plan(plan: Plan, console: Console) -> None:
    study = plan.study
    seeds = study.seed_list
    console.print(f"[bold]{study.name}[/bold] ({plan.path}): trainer {study.trainer}, backend {study.backend}, "
                  f"{len(plan.arm_runs)} arm runs = {len(plan.arm_runs) // len(seeds)} arms x {len(seeds)} seeds "
                  f"{seeds}", soft_wrap=True)
    cross_family = len({info.name for info in plan.trainers.values()}) > 1
    table = Table(show_header=True, header_style="bold")
    for column in ("arm",) + (("trainer",) if cross_family else ()) + ("changes from base", "steps", "seeds"):
        table.add_column(column)
    steps = {run.arm: run.config.get("steps") for run in plan.arm_runs}
    n_seeds = f"{len(seeds)}-{study.max_seeds}" if study.adaptive else str(len(seeds))
    for arm, change in arm_changes(plan).items():
        marker = " (baseline)" if arm == study.baseline else ""
        trainer = (plan.trainers[arm].name,) if cross_family else ()
        table.add_row(arm + marker, *trainer, change, str(steps[arm]), n_seeds)
    console.print(table)
    for line in seed_lines(plan) + early_stop_lines(plan):
        console.print(line, soft_wrap=True)
    res = study.resources
    memory = f", {res.gpu_memory_gb} GB GPU memory" if res.gpu_memory_gb else ""
    console.print(f"resources per arm run: {res.gpus:g} GPU, {res.cpus:g} CPU{memory} "
                  f"(CPU only where there is no GPU); primary metric {study.metric.name} ({study.metric.mode})")
    if caveat := metric_caveat(plan.trainers.values(), study.metric.name):
        console.print(f"caution: {caveat}", soft_wrap=True, markup=False, highlight=False)
    est = estimate(plan, res.gpus)
    if est is not None:
        console.print(f"cost estimate: {est.describe()}")
        if study.adaptive:
            most = estimate(plan, res.gpus, len(plan.arm_runs) // len(seeds) * study.max_seeds)
            console.print(f"at most, with {study.max_seeds} seeds for every arm: {most.describe()}")
    if study.budget.max_dollars:
        console.print(f"budget: ${study.budget.max_dollars:.2f}")
    if study.backend == "vast":
        for line in vast_offer_lines(study):
            console.print(line, soft_wrap=True, markup=False, highlight=False)


PLAN_OFFERS = 5                 # ranked offers the plan shows
PLAN_SEARCH_SECONDS = 5.0       # the plan's offer search gives up after this long (the plan never waits on it)


def vast_offer_lines(study) -> list[str]:
    """The offers a vast study would rent, best first, from a live search (the ranking `_launch` walks: a failed
    offer moves on to the next); a line saying why not when the API cannot be asked."""
    from orchestrator.backends.vast import provider
    from orchestrator.backends.vast.config import VastConfig
    from orchestrator.backends.vast.offers import format_plan, plan_rows, rank

    cfg = VastConfig.model_validate(study.vast or {})
    quick = cfg.model_copy(update={"api_deadline_seconds": min(cfg.api_deadline_seconds, PLAN_SEARCH_SECONDS)})
    try:
        offers = rank(provider.search_offers(provider.make_client(cfg.server_url), quick), set(), cfg=cfg)
    except (UserError, provider.ProviderError) as exc:
        return [f"vast offers: not searched ({exc})"]
    kind = "bids" if cfg.interruptible else "on demand"
    return [f"vast offers, best first by $/h over reliability ({kind}; a failed one moves on to the next):",
            *format_plan(plan_rows(offers[:PLAN_OFFERS], cfg))]


def estimate_event(ledger: Ledger, run_id: str, plan: Plan, gpus: float) -> None:
    est = estimate(plan, gpus)
    if est is not None:
        record_estimate(ledger, run_id, est)
