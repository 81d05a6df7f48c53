"""The arms spec: a YAML file of ablation arms, read as the pydantic models below.

    name: maskgit-codebook              # the study; run ids are <name>-<date>-<time>
    trainer: maskgit                    # a module under trainers/
    base: {steps: 300, model.dim: 64}   # overrides of the trainer's Config shared by every arm
    arms:
      - name: baseline
      - name: small-codebook
        set: {tokenizer.model.codebook_size: 32}
    grid: {lr: [1e-3, 3e-4]}            # optional: every arm x every combination (as W&B grid sweeps)
    seeds: 2                            # replicates: 2 means seeds 0 and 1; or a list [0, 7];
                                        # or {min: 3, max: 8}: more seeds only where a verdict is open
    metric: {name: kid_scratchenc, mode: min}   # a metric of the trainer; validate says what can flatter it
    baseline: baseline
    early_stop: {decided: true}         # optional: stop arms shown worse at an interim look; or
                                        # {halving: {grace_steps, reduction_factor}} (EarlyStopping below)

Keys in `base` and `set` are dotted paths into the trainer's Config (nested
maps work too) and are deep-merged: base, then the arm, then its grid point.
An arm may name a `trainer` of its own (a cross-family study, e.g. DCGAN vs VAE).

Replicates are paired and complete: seed k of every arm trains with seed=k and
data.draw=k, and so does every upstream run it needs (a tokenizer, a VAE: one per
distinct config and seed, shared by the arms that need it; the judge, an upstream
of scope "study": one per seed, configured by the baseline, shared by every arm).
This module knows nothing of Ray, SSH or Vast; `load_plan` turns a file into
the list of arm runs to schedule, or raises SpecError naming file, field and line.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.backends.provision import PROVIDER_SECTIONS, section_model
from orchestrator.errors import SpecError
from orchestrator.telemetry.watchdog import WatchdogConfig
from orchestrator.trainer_registry import TrainerInfo, load_trainer, metric_caveat
from orchestrator.yamlsafe import Lines, line_of, load_yaml, loads_yaml

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.=@+-]*$"
MAX_ARM_RUNS_WITHOUT_YES = 64


class Metric(BaseModel):
    """The primary metric: one of the trainer's summary metrics, and which way is better."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a key of the trainer's METRICS (written to summary.json)")
    mode: Literal["min", "max"] = Field(description="min: lower is better; max: higher is better")


class Arm(BaseModel):
    """One variant of the base config."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits and _ . = @ + -")
    description: str = ""
    set: dict[str, Any] = Field(default_factory=dict, description="dotted config keys and their values")
    trainer: str | None = Field(None, description="a trainer module for this arm (cross-family studies); "
                                                  "default: the study's trainer")


class Resources(BaseModel):
    """What one arm run needs."""
    model_config = ConfigDict(extra="forbid")
    gpus: float = Field(1.0, ge=0, description="GPUs per arm run; a fraction (0.25, 0.5) packs arms on one card")
    cpus: float = Field(1.0, gt=0, description="CPU cores per arm run (also its torch thread count)")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="GPU memory an arm run needs; packed arms never ask for more than the card has")

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("more than one GPU must be a whole number")
        return value


class Budget(BaseModel):
    """Money: enforced for rented instances, reported for local runs (measured local energy is priced by
    ARMATURE_DOLLARS_PER_KWH, default 0.30, and ARMATURE_HARDWARE_DOLLARS_PER_GPU_HOUR, default 0; a local
    attempt without an energy reading by ARMATURE_MACHINE_DOLLARS_PER_HOUR, default 0.10, see orchestrator/cost)."""
    model_config = ConfigDict(extra="forbid")
    max_dollars: float | None = Field(None, gt=0, description="no launch may cross it; reaching it stops the run")
    expected_hours_per_arm: float | None = Field(None, gt=0, description="for the cost estimate before a run")


class EarlyStop(BaseModel):
    """Stop an arm run whose metric crosses a bound after a given step (Ray Tune's stopper)."""
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="a key of the trainer's metrics.jsonl rows, e.g. loss")
    after_step: int = Field(0, ge=0)
    above: float | None = None
    below: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "EarlyStop":
        if self.above is None and self.below is None:
            raise ValueError("give `above` or `below`")
        return self


class Halving(BaseModel):
    """Successive halving (as in ASHA): at grace_steps x reduction_factor^k steps keep the best
    1/reduction_factor of the arms (the baseline always goes on); see orchestrator/early_stop.py."""
    model_config = ConfigDict(extra="forbid")
    grace_steps: int = Field(ge=1, description="the first rung: every arm trains at least this many steps")
    reduction_factor: int = Field(2, ge=2, description="keep the best 1/reduction_factor of the arms at each rung")


class EarlyStopping(BaseModel):
    """`early_stop:` either a list of bound rules (EarlyStop), or this mapping:

        early_stop:
          decided: true            # stop an arm shown worse than the baseline at an interim look
          looks: 4                 # at most this many interim looks (evaluation steps all arms share)
          after_step: 100          # no look before this step
          boundary: bonferroni     # or obrien-fleming: how the study's alpha is spent over the looks
          halving: {grace_steps: 100, reduction_factor: 2}   # successive halving, for grid searches
          rules: [{metric: loss, above: 10}]                 # bound rules, as in the list form

    The statistics (paired t-test at the look's step, one-sided for worse, Bonferroni over the arms compared at a look, alpha spent
    over the planned looks) and the halving rule are described in orchestrator/early_stop.py. Stopped arms are
    reported apart, never in the final verdicts."""
    model_config = ConfigDict(extra="forbid")
    decided: bool = Field(False, description="stop arms decided worse than the baseline at an interim look")
    looks: int = Field(4, ge=1, description="at most this many interim looks for `decided`")
    after_step: int = Field(1, ge=1, description="no interim look before this step")
    boundary: Literal["bonferroni", "obrien-fleming"] = Field(
        "bonferroni", description="alpha per look: split equally, or O'Brien-Fleming-type spending")
    halving: Halving | None = Field(None, description="successive halving: {grace_steps, reduction_factor}")
    rules: list[EarlyStop] = Field(default_factory=list, description="stop an arm run whose metric crosses a bound")


class AdaptiveSeeds(BaseModel):
    """Start every arm with `min` seeds; add one seed at a time where an arm's verdict is still open."""
    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=2, description="seeds every arm starts with (a verdict needs at least 2)")
    max: int = Field(description="the most seeds any arm gets")

    @model_validator(mode="after")
    def _ordered(self) -> "AdaptiveSeeds":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class Study(BaseModel):
    """An ablation study: arms x seeds of one trainer (or of one trainer per arm)."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    trainer: str = Field(description="a module under trainers/, e.g. maskgit")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="trainer config shared by every arm")
    arms: list[Arm] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; cartesian product")
    seeds: int | list[int] | AdaptiveSeeds = Field(
        1, description="a count (0..n-1), explicit seeds, or {min, max}: min seeds, more where a verdict is open")
    metric: Metric
    baseline: str | None = Field(None, description="the arm the others are compared with")
    resources: Resources = Field(default_factory=Resources)
    backend: Literal["local", "vast", "ssh"] = "local"
    ray_address: str | None = Field(None, description="an existing Ray cluster (else RAY_ADDRESS, else a local Ray)")
    budget: Budget = Field(default_factory=Budget)
    early_stop: EarlyStopping = Field(
        default_factory=EarlyStopping,
        description="a list of bound rules, or {decided, looks, after_step, boundary, halving, rules}")
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    max_attempts: int = Field(4, ge=1, description="attempts per arm run that may fail or lose their machine; a "
                              "preemption counts only when the next attempt did not continue past it (nothing was "
                              "checkpointed)")
    vast: dict[str, Any] = Field(default_factory=dict,
                                 description="offer query and instance settings for backend vast "
                                             "(orchestrator/backends/vast/config.py)")
    ssh: dict[str, Any] = Field(default_factory=dict,
                                description="your own machines for backend ssh: hosts [{name, address, port, user, "
                                            "identity_file, gpus, python}] (orchestrator/backends/ssh/config.py)")

    @field_validator("early_stop", mode="before")
    @classmethod
    def _rules_list(cls, value: Any) -> Any:
        """The list form is the bound rules alone."""
        return {"rules": value} if isinstance(value, list) else value

    @field_validator("seeds", mode="before")
    @classmethod
    def _adaptive_seeds(cls, value: Any) -> Any:
        """{min, max}: validated here so that a mistake reads as one message, not one per kind of `seeds`."""
        if not isinstance(value, dict):
            return value
        try:
            return AdaptiveSeeds.model_validate(value)
        except ValidationError as exc:
            problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                        .lstrip(": ") for err in exc.errors()]
            raise ValueError(f"{{min, max}}: {'; '.join(problems)}") from None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int] | AdaptiveSeeds) -> int | list[int] | AdaptiveSeeds:
        if isinstance(value, int) and value < 1:
            raise ValueError("at least one seed")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a non-empty list of distinct seeds")
        return value

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return value

    @property
    def adaptive(self) -> bool:
        return isinstance(self.seeds, AdaptiveSeeds)

    @property
    def seed_list(self) -> list[int]:
        """The seeds planned at the start (adaptive studies: the first `min`)."""
        if isinstance(self.seeds, AdaptiveSeeds):
            return list(range(self.seeds.min))
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def max_seeds(self) -> int:
        return self.seeds.max if isinstance(self.seeds, AdaptiveSeeds) else len(self.seed_list)


# ---- the plan -------------------------------------------------------------------


@dataclass
class PlannedUpstream:
    """A run of an upstream trainer (e.g. the VQ-VAE tokenizer, the judge) that arm runs of one seed share."""
    trainer: str
    config: dict
    config_hash: str
    upstream: dict[str, "PlannedUpstream"] = field(default_factory=dict)  # its own upstream runs (dir field ->)

    @property
    def name(self) -> str:
        return f"upstream-{self.trainer}-{self.config_hash[:8]}"

    @property
    def seed(self) -> int:
        return self.config.get("seed", 0)


@dataclass
class PlannedArmRun:
    arm: str
    seed: int
    config: dict                          # validated trainer config (seed included, upstream dirs not)
    config_hash: str
    upstream: dict[str, PlannedUpstream] = field(default_factory=dict)  # dir field -> upstream run
    trainer: str = ""                     # the arm's trainer module


@dataclass
class Plan:
    path: Path
    study: Study
    trainer: TrainerInfo                  # the study's trainer
    arm_runs: list[PlannedArmRun]
    upstreams: list[PlannedUpstream]      # an upstream run comes after the upstream runs it needs
    resolved: dict                        # the spec after --set, as written to runs/<id>/spec.yaml
    trainers: dict[str, TrainerInfo] = field(default_factory=dict)   # arm -> its trainer

    def total_steps(self, config: dict) -> int | None:
        return config.get("steps")


# ---- dotted keys ----------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c.d': 2} -> {'a.b': 1, 'c.d': 2}; lists are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{dotted!r} sets a key inside {part!r}, which is already a value")
            node = child
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ValueError(f"{dotted!r} replaces a whole section with a value")
        node[parts[-1]] = value
    return tree


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every valid dotted key of a pydantic model, sections included."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_config_keys(annotation, f"{prefix}{name}."))
    return keys


# ---- loading --------------------------------------------------------------------


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE arguments; VALUE is read as YAML (so 3, 1e-3, true, [1, 2] work)."""
    parsed = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set base.steps=100")
        text = value if value.strip() else "null"
        parsed[key.strip()], _ = loads_yaml(text, f"--set {key.strip()}")
    return parsed


TOP_LEVEL_SET = {"name", "trainer", "description", "seeds", "baseline", "backend", "ray_address", "max_attempts"}
SECTION_SET = {"metric", "resources", "budget", "watchdog", "vast", "ssh", "early_stop"}


def _apply_sets(raw: dict, sets: dict[str, Any]) -> dict[str, Any]:
    """Apply --set overrides to the raw spec; return the ones aimed at `base` (as dotted keys)."""
    base_sets = {}
    for key, value in sets.items():
        head, _, rest = key.partition(".")
        if head == "base" and rest:
            base_sets[rest] = value
        elif head in TOP_LEVEL_SET and not rest:
            raw[head] = value
        elif head in SECTION_SET and rest:
            section = raw.setdefault(head, {})
            if not isinstance(section, dict):
                raise SpecError(f"--set {key}: `{head}` in the spec is not a section")
            node = section
            parts = rest.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        else:
            raise SpecError(f"--set {key}: expected base.<config key>, one of {sorted(TOP_LEVEL_SET)}, "
                            f"or <section>.<field> for sections {sorted(SECTION_SET)}")
    return base_sets


def _format_validation(path: Path, lines: Lines, exc: ValidationError, prefix: tuple = ()) -> str:
    problems = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        line = line_of(lines, loc)
        where = f"{path}:{line}" if line else str(path)
        field_name = ".".join(str(p) for p in loc) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "required field missing"
        problems.append(f"{where}: {field_name}: {message}")
    return "\n".join(problems)


def load_plan(path: str | Path, sets: list[str] = (), yes: bool = False) -> Plan:
    """Read, validate and expand a spec. Raises SpecError; touches nothing on disk."""
    path = Path(path)
    raw, lines = load_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of spec fields (name, trainer, arms, ...), "
                        f"got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    base_sets = _apply_sets(raw, parse_sets(list(sets)))
    try:
        study = Study.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation(path, lines, exc)) from None

    where = _Where(path, lines)
    trainer = load_trainer(study.trainer, where=f"{where.at(('trainer',))}: trainer")
    _check_metric(study.metric, trainer, where)
    for section in PROVIDER_SECTIONS:
        if study.backend == section or getattr(study, section):
            _check_provider_section(study, section, where)

    # (arm name, flat overrides, where each key came from)
    base_flat = {**flatten(study.base), **base_sets}
    sources = {key: where.at(("base",) + _yaml_path(study.base, key)) for key in flatten(study.base)}
    sources.update({key: f"--set base.{key}" for key in base_sets})

    named_arms = study.arms or [Arm(name="base")]
    names = [a.name for a in named_arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"{where.at(('arms',))}: arm names must be unique; repeated: {', '.join(duplicates)}")

    arm_trainers = {study.trainer: trainer}
    variants: list[_Variant] = []
    grid_keys = list(study.grid)
    _check_grid_labels(study.grid, where)
    for index, arm in enumerate(named_arms):
        info = arm_trainers.get(arm.trainer or study.trainer)
        if info is None:
            at = where.at(("arms", index, "trainer"))
            info = arm_trainers[arm.trainer] = load_trainer(arm.trainer, where=f"{at}: arm {arm.name!r}: trainer")
        if info is not trainer:
            _check_metric(study.metric, info, where, arm=(arm.name, index))
        arm_flat = flatten(arm.set)
        arm_sources = {k: where.at(("arms", index, "set") + _yaml_path(arm.set, k)) for k in arm_flat}
        grid_sources = {k: where.at(("grid", k)) for k in grid_keys}
        for point in itertools.product(*(study.grid[k] for k in grid_keys)):
            label = "_".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in zip(grid_keys, point))
            name = arm.name if not grid_keys else (label if not study.arms else f"{arm.name}@{label}")
            variants.append(_Variant(name, info, {**base_flat, **arm_flat, **dict(zip(grid_keys, point))},
                                     {**sources, **arm_sources, **grid_sources}, [*arm_flat, *grid_keys]))

    seen: set[str] = set()
    for variant in variants:
        if variant.name in seen:        # labels unique per key can still join into one name ("a_b" + "c")
            raise SpecError(f"{where.at(('grid',))}: two grid points are both named {variant.name!r}; "
                            f"grid values must give distinct arm names")
        seen.add(variant.name)
        _check_keys(variant)
    if study.baseline is not None and study.baseline not in {v.name for v in variants}:
        raise SpecError(f"{where.at(('baseline',))}: baseline {study.baseline!r} is not an arm; arms: "
                        f"{', '.join(v.name for v in variants)}")
    if study.adaptive and (study.baseline is None or len(variants) < 2):
        raise SpecError(f"{where.at(('seeds',))}: seeds {{min, max}} adds seeds where an arm's verdict against "
                        f"the baseline is still open: it needs a `baseline:` and at least one other arm")

    n_runs = len(variants) * study.max_seeds
    if n_runs > MAX_ARM_RUNS_WITHOUT_YES and not yes:
        up_to = "up to " if study.adaptive else ""
        raise SpecError(f"{path}: {len(variants)} arms x {up_to}{study.max_seeds} seeds = {n_runs} arm runs; "
                        f"more than {MAX_ARM_RUNS_WITHOUT_YES} needs --yes")

    for variant in variants:
        variant.config = _validate_config(variant.trainer, variant.name, variant.flat, variant.sources, path)

    by_hash: dict[str, str] = {}
    for variant in variants:
        digest = config_hash({"trainer": variant.trainer.name, **variant.config})
        if digest in by_hash:
            raise SpecError(f"{path}: arms {by_hash[digest]!r} and {variant.name!r} resolve to the identical config; "
                            f"one of them would measure nothing new")
        by_hash[digest] = variant.name

    from orchestrator.early_stop import plan_problem
    problem = plan_problem(study.early_stop, {v.name: v.config for v in variants}, study.baseline)
    if problem:
        raise SpecError(f"{where.at(('early_stop',) + problem[0])}: early_stop.{problem[0][0]}: {problem[1]}")
    stopping = [rule for rule, on in (("decided", study.early_stop.decided),
                                      ("halving", study.early_stop.halving is not None)) if on]
    caveat = metric_caveat([v.trainer for v in variants], study.metric.name)
    if stopping and caveat:
        raise SpecError(f"{where.at(('early_stop', stopping[0]))}: early_stop.{stopping[0]} ranks arms by the primary "
                        f"metric, and {caveat}: a stop could end the arm that is really better. Choose a primary "
                        f"metric without such a caution (validate prints none for kid_scratchenc) or drop "
                        f"early_stop.{stopping[0]}")

    shared = _study_upstreams(variants, study.baseline)
    planned: dict[str, PlannedUpstream] = {}
    arm_runs = []
    for variant in variants:
        _check_resolution(variant, shared, path)
        aligned = _align_upstreams(variant.config, variant.trainer, set(variant.flat), shared)
        config = _validate_config(variant.trainer, variant.name, flatten(aligned), {}, path)
        for seed in study.seed_list:
            seeded = replicate(config, variant.trainer, seed)
            links = upstream_runs(seeded, variant.trainer, planned)
            arm_runs.append(PlannedArmRun(variant.name, seed, seeded, config_hash(seeded), links,
                                          variant.trainer.name))

    resolved = study.model_dump(mode="json")
    resolved["base"] = unflatten(base_flat)
    return Plan(path, study, trainer, arm_runs, list(planned.values()), resolved,
                {v.name: v.trainer for v in variants})


# ---- replicates and upstream runs ---------------------------------------------------


def replicate(config: dict, trainer: TrainerInfo, seed: int) -> dict:
    """Seed `seed` of an arm: the config, and every upstream config inside it that is trained here (no
    folder given), get seed=k and data.draw=k, so init, batch order, data draw and upstream runs all vary."""
    seeded = {**config, "seed": seed, "data": {**config["data"], "draw": seed}}
    for fieldname, link in trainer.upstream.items():
        if not seeded.get(link.dir_field):
            seeded[fieldname] = replicate(seeded[fieldname], load_trainer(link.trainer), seed)
    return seeded


def upstream_runs(config: dict, trainer: TrainerInfo,
                  planned: dict[str, PlannedUpstream]) -> dict[str, PlannedUpstream]:
    """The upstream runs a config needs (dir field -> run), each planned once in `planned` (config hash -> run),
    after the upstream runs it needs itself."""
    links = {}
    for fieldname, link in trainer.upstream.items():
        if config.get(link.dir_field):
            continue          # the user points at an existing artifact: nothing to train upstream
        up_config = config[fieldname]
        digest = config_hash({"trainer": link.trainer, **up_config})
        if digest not in planned:
            nested = upstream_runs(up_config, load_trainer(link.trainer), planned)
            planned[digest] = PlannedUpstream(link.trainer, up_config, digest, nested)
        links[link.dir_field] = planned[digest]
    return links


@dataclass
class _Variant:
    """An arm (or an arm at a grid point) before its seeds."""
    name: str
    trainer: TrainerInfo
    flat: dict[str, Any]                  # base, arm and grid keys merged
    sources: dict[str, str]               # key -> where it was written
    own_keys: list[str]                   # keys this arm sets on top of base (its `set` and the grid)
    config: dict = field(default_factory=dict)


def _check_metric(metric: Metric, trainer: TrainerInfo, where: "_Where", arm: tuple[str, int] | None = None) -> None:
    """The primary metric is one of the trainer's, with the same direction."""
    name_at = where.at(("arms", arm[1], "trainer")) if arm else where.at(("metric", "name"))
    mode_at = where.at(("arms", arm[1], "trainer")) if arm else where.at(("metric", "mode"))
    who = f"arm {arm[0]!r}: " if arm else ""
    if metric.name not in trainer.metrics:
        raise SpecError(f"{name_at}: {who}metric {metric.name!r} is not one of trainer {trainer.name}'s metrics: "
                        f"{', '.join(sorted(trainer.metrics))}")
    if metric.mode != trainer.metrics[metric.name]:
        raise SpecError(f"{mode_at}: {who}{metric.name} is better when {trainer.metrics[metric.name]}imised in "
                        f"trainer {trainer.name}; mode {metric.mode!r} would rank arms backwards")


def _check_keys(variant: _Variant) -> None:
    """No key may set what replicates set (seeds, data draws), nor change an upstream that all arms share."""
    replicate_keys = {"seed", "data.draw"}
    for fieldname, link in variant.trainer.upstream.items():
        replicate_keys |= {f"{fieldname}.seed", f"{fieldname}.data.draw"}
    for key in variant.flat:
        if key in replicate_keys:
            raise SpecError(f"{variant.sources.get(key, key)}: {key}: each replicate gets seed=k and data.draw=k; "
                            f"set replicates with `seeds:`")
    shared_fields = _study_scope_fields(variant.trainer)
    for key in variant.own_keys:
        for fieldname, (dir_field, up_trainer) in shared_fields.items():
            if key in (fieldname, dir_field) or key.startswith(fieldname + "."):
                raise SpecError(f"{variant.sources[key]}: arm {variant.name!r}: {key}: the {fieldname} "
                                f"({up_trainer}) is shared by every arm of the study, so one arm cannot change "
                                f"it; set it in `base`")


def _study_scope_fields(trainer: TrainerInfo, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Dotted config field of every upstream of scope "study", nested ones included -> (its dir field, trainer)."""
    found = {}
    for fieldname, link in trainer.upstream.items():
        if link.scope == "study":
            found[prefix + fieldname] = (prefix + link.dir_field, link.trainer)
        else:
            found.update(_study_scope_fields(load_trainer(link.trainer), f"{prefix}{fieldname}."))
    return found


def _sets_data(keys: set[str], fieldname: str) -> bool:
    return any(k == f"{fieldname}.data" or k.startswith(f"{fieldname}.data.") for k in keys)


def _study_upstreams(variants: list[_Variant], baseline: str | None) -> dict[str, dict]:
    """Upstream configs of scope "study" (the judge): the baseline's (else the first arm's that has one),
    trained on the baseline's data; field name -> config."""
    shared = {}
    ordered = sorted(variants, key=lambda v: v.name != baseline)
    for variant in ordered:
        for fieldname, link in variant.trainer.upstream.items():
            if link.scope != "study" or fieldname in shared or variant.config.get(link.dir_field):
                continue
            up_config = variant.config[fieldname]
            if not _sets_data(set(variant.flat), fieldname):
                up_config = {**up_config, "data": variant.config["data"]}
            shared[fieldname] = up_config
    return shared


def _check_resolution(variant: _Variant, shared: dict[str, dict], path: Path) -> None:
    for fieldname, link in variant.trainer.upstream.items():
        if link.scope != "study" or fieldname not in shared or variant.config.get(link.dir_field):
            continue
        resolution = variant.config["data"]["resolution"]
        judged = shared[fieldname]["data"]["resolution"]
        if resolution != judged:
            source = variant.sources.get("data.resolution") or variant.sources.get("data") or str(path)
            raise SpecError(f"{source}: arm {variant.name!r}: data.resolution {resolution} differs from the "
                            f"{fieldname}'s {judged} (the baseline's data): every arm of a study is scored by one "
                            f"{link.trainer} at one resolution")


def _align_upstreams(config: dict, trainer: TrainerInfo, user_keys: set[str], shared: dict[str, dict],
                     prefix: str = "") -> dict:
    """Upstream configs inside an arm config: one of scope "arm" trains on the arm's data (unless the spec sets
    its data), one of scope "study" is the study's."""
    aligned = dict(config)
    for fieldname, link in trainer.upstream.items():
        if aligned.get(link.dir_field):
            continue
        if link.scope == "study" and fieldname in shared:
            aligned[fieldname] = shared[fieldname]
            continue
        up_config = dict(aligned[fieldname])
        if not _sets_data(user_keys, prefix + fieldname):
            up_config["data"] = aligned["data"]
        aligned[fieldname] = _align_upstreams(up_config, load_trainer(link.trainer), user_keys, shared,
                                              f"{prefix}{fieldname}.")
    return aligned


class _Where:
    def __init__(self, path: Path, lines: Lines):
        self.path, self.lines = path, lines

    def at(self, yaml_path: tuple) -> str:
        line = line_of(self.lines, yaml_path)
        return f"{self.path}:{line}" if line else str(self.path)


def _yaml_path(tree: dict, dotted: str) -> tuple:
    """Where a flattened key sits in the YAML (it may be written nested or dotted)."""
    if dotted in tree:
        return (dotted,)
    head, _, rest = dotted.partition(".")
    for key, value in tree.items():
        if isinstance(value, dict) and dotted.startswith(key + "."):
            return (key,) + _yaml_path(value, dotted[len(key) + 1:])
    return (head,)


def _check_grid_labels(grid: dict[str, list[Any]], where: "_Where") -> None:
    """Two values of one grid key must differ as labels and as numbers: one label would give their arms one name
    (one of them lost, its runs taken for the other's seeds), and YAML reads 1e-3 as a string that the trainer's
    config then reads as the number 0.001."""
    for key, values in grid.items():
        seen: dict[Any, Any] = {}
        for value in values:
            for same in (_short(value), _as_number(value)):
                if same is not None and same in seen:
                    raise SpecError(f"{where.at(('grid', key))}: grid {key}: values {seen[same]!r} and {value!r} "
                                    f"are the same value or give the same arm label ({key.split('.')[-1]}="
                                    f"{_short(value)}); give distinct values")
            seen.update({same: value for same in (_short(value), _as_number(value)) if same is not None})


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace(" ", "").replace("/", "-").replace('"', "")


def _validate_config(trainer: TrainerInfo, arm: str, flat: dict[str, Any], sources: dict[str, str],
                     path: Path) -> dict:
    try:
        tree = unflatten(flat)
    except ValueError as exc:
        raise SpecError(f"{path}: arm {arm!r}: {exc}") from None
    try:
        config = trainer.config_cls.model_validate(tree)
    except ValidationError as exc:
        problems = []
        valid = _config_keys(trainer.config_cls)
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            source = next((sources[k] for k in sorted(sources, key=len, reverse=True)
                           if dotted == k or dotted.startswith(k + ".") or k.startswith(dotted + ".")), str(path))
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
                hint = f"; closest valid keys: {', '.join(close)}" if close else \
                    f"; valid keys: {', '.join(k for k in valid if '.' not in k)}"
                problems.append(f"{source}: arm {arm!r}: unknown key {dotted!r} for trainer {trainer.name}{hint}")
            else:
                problems.append(f"{source}: arm {arm!r}: {dotted or 'config'}: {err['msg']}")
        raise SpecError("\n".join(problems)) from None
    return config.model_dump(mode="json")


def _check_provider_section(study: Study, section: str, where: _Where) -> None:
    """A provider's section (`vast:`, `ssh:`), validated here so errors come before any run."""
    try:
        section_model(section).model_validate(getattr(study, section))
    except ValidationError as exc:
        raise SpecError(_format_validation(where.path, where.lines, exc, prefix=(section,))) from None


def spec_yaml(plan: Plan, git: dict) -> str:
    """The resolved spec written to runs/<run_id>/spec.yaml, with the code it ran."""
    document = {"source": str(plan.path), "git": git, **plan.resolved}
    return yaml.safe_dump(document, sort_keys=False)


def json_schema() -> dict:
    schema = Study.model_json_schema()
    for section in PROVIDER_SECTIONS:
        schema["properties"][section] = {**section_model(section).model_json_schema(),
                                         "description": schema["properties"][section]["description"]}
    return schema
