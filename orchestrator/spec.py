"""The arms spec: a YAML file of ablation arms, read as the pydantic models below.

    name: maskgit-codebook              # the study; run ids are <name>-<date>-<time>
    trainer: maskgit                    # a module under trainers/
    base: {steps: 300, model.dim: 64}   # overrides of the trainer's Config shared by every arm
    arms:
      - name: baseline
      - name: small-codebook
        set: {tokenizer.codebook_size: 32}
    grid: {lr: [1e-3, 3e-4]}            # optional: every arm x every combination (as W&B grid sweeps)
    seeds: 2                            # replicates: 2 means seeds 0 and 1; or a list [0, 7]
    metric: {name: heldout_masked_acc, mode: max}
    baseline: baseline

Keys in `base` and `set` are dotted paths into the trainer's Config (nested
maps work too) and are deep-merged: base, then the arm, then its grid point.
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

from orchestrator.errors import SpecError
from orchestrator.telemetry.watchdog import WatchdogConfig
from orchestrator.trainer_registry import TrainerInfo, load_trainer
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
    """Money: enforced for rented instances, reported for local runs (local energy is priced by
    ARMATURE_DOLLARS_PER_KWH, default 0.30, and ARMATURE_HARDWARE_DOLLARS_PER_GPU_HOUR, default 0)."""
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


class Study(BaseModel):
    """An ablation study: arms x seeds of one trainer."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    trainer: str = Field(description="a module under trainers/, e.g. maskgit")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="trainer config shared by every arm")
    arms: list[Arm] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; cartesian product")
    seeds: int | list[int] = Field(1, description="a count (0..n-1) or explicit seeds")
    metric: Metric
    baseline: str | None = Field(None, description="the arm the others are compared with")
    resources: Resources = Field(default_factory=Resources)
    backend: Literal["local", "vast"] = "local"
    ray_address: str | None = Field(None, description="an existing Ray cluster (else RAY_ADDRESS, else a local Ray)")
    budget: Budget = Field(default_factory=Budget)
    early_stop: list[EarlyStop] = Field(default_factory=list)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    max_attempts: int = Field(4, ge=1, description="attempts per arm run when instances are preempted or lost")
    vast: dict[str, Any] = Field(default_factory=dict,
                                 description="offer query and instance settings for backend vast "
                                             "(orchestrator/backends/vast/config.py)")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
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
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


# ---- the plan -------------------------------------------------------------------


@dataclass
class PlannedUpstream:
    """A run of an upstream trainer (e.g. the VQ-VAE tokenizer) that arms share."""
    trainer: str
    config: dict
    config_hash: str

    @property
    def name(self) -> str:
        return f"upstream-{self.trainer}-{self.config_hash[:8]}"


@dataclass
class PlannedArmRun:
    arm: str
    seed: int
    config: dict                          # validated trainer config (seed included, upstream dirs not)
    config_hash: str
    upstream: dict[str, PlannedUpstream] = field(default_factory=dict)  # dir field -> upstream run


@dataclass
class Plan:
    path: Path
    study: Study
    trainer: TrainerInfo
    arm_runs: list[PlannedArmRun]
    upstreams: list[PlannedUpstream]
    resolved: dict                        # the spec after --set, as written to runs/<id>/spec.yaml

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
SECTION_SET = {"metric", "resources", "budget", "watchdog", "vast"}


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

    trainer = load_trainer(study.trainer, where=f"{path}:{line_of(lines, ('trainer',))}: trainer")
    where = _Where(path, lines)

    if study.metric.name not in trainer.metrics:
        raise SpecError(f"{where.at(('metric', 'name'))}: metric {study.metric.name!r} is not one of trainer "
                        f"{trainer.name}'s metrics: {', '.join(sorted(trainer.metrics))}")
    if study.metric.mode != trainer.metrics[study.metric.name]:
        raise SpecError(f"{where.at(('metric', 'mode'))}: {study.metric.name} is better when "
                        f"{trainer.metrics[study.metric.name]}imised; mode {study.metric.mode!r} would rank arms "
                        f"backwards")
    if "seed" in flatten(study.base) or "seed" in base_sets:
        raise SpecError(f"{where.at(('base', 'seed'))}: set replicates with `seeds:`, not base.seed")
    if study.backend == "vast" or study.vast:
        _check_vast_section(study, where)

    # (arm name, flat overrides, where each key came from)
    base_flat = {**flatten(study.base), **base_sets}
    sources = {key: where.at(("base",) + _yaml_path(study.base, key)) for key in flatten(study.base)}
    sources.update({key: f"--set base.{key}" for key in base_sets})

    named_arms = study.arms or [Arm(name="base")]
    names = [a.name for a in named_arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"{where.at(('arms',))}: arm names must be unique; repeated: {', '.join(duplicates)}")

    variants: list[tuple[str, dict[str, Any], dict[str, str]]] = []
    grid_keys = list(study.grid)
    for index, arm in enumerate(named_arms):
        arm_flat = flatten(arm.set)
        arm_sources = {k: where.at(("arms", index, "set") + _yaml_path(arm.set, k)) for k in arm_flat}
        for point in itertools.product(*(study.grid[k] for k in grid_keys)):
            label = "_".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in zip(grid_keys, point))
            name = arm.name if not grid_keys else (label if not study.arms else f"{arm.name}@{label}")
            grid_sources = {k: where.at(("grid", k)) for k in grid_keys}
            variants.append((name, {**base_flat, **arm_flat, **dict(zip(grid_keys, point))},
                             {**sources, **arm_sources, **grid_sources}))

    if study.baseline is not None and study.baseline not in {v[0] for v in variants}:
        raise SpecError(f"{where.at(('baseline',))}: baseline {study.baseline!r} is not an arm; arms: "
                        f"{', '.join(v[0] for v in variants)}")

    n_runs = len(variants) * len(study.seed_list)
    if n_runs > MAX_ARM_RUNS_WITHOUT_YES and not yes:
        raise SpecError(f"{path}: {len(variants)} arms x {len(study.seed_list)} seeds = {n_runs} arm runs; "
                        f"more than {MAX_ARM_RUNS_WITHOUT_YES} needs --yes")

    resolved_configs: dict[str, dict] = {}
    for name, flat, key_sources in variants:
        resolved_configs[name] = _validate_config(trainer, name, flat, key_sources, path)

    by_hash: dict[str, str] = {}
    for name, config in resolved_configs.items():
        digest = config_hash(config)
        if digest in by_hash:
            raise SpecError(f"{path}: arms {by_hash[digest]!r} and {name!r} resolve to the identical config; "
                            f"one of them would measure nothing new")
        by_hash[digest] = name

    upstreams: dict[str, PlannedUpstream] = {}
    arm_runs = []
    for name, config in resolved_configs.items():
        links = {}
        for fieldname, link in trainer.upstream.items():
            if config.get(link.dir_field):
                continue          # the user points at an existing artifact: nothing to train upstream
            up_config = config[fieldname]
            up = PlannedUpstream(link.trainer, up_config, config_hash({"trainer": link.trainer, **up_config}))
            links[link.dir_field] = upstreams.setdefault(up.config_hash, up)
        for seed in study.seed_list:
            seeded = {**config, "seed": seed}
            arm_runs.append(PlannedArmRun(name, seed, seeded, config_hash(seeded), links))

    resolved = study.model_dump(mode="json")
    resolved["base"] = unflatten(base_flat)
    return Plan(path, study, trainer, arm_runs, list(upstreams.values()), resolved)


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


def _check_vast_section(study: Study, where: _Where) -> None:
    from orchestrator.backends.vast.config import VastConfig   # validated here so errors come before any run

    try:
        VastConfig.model_validate(study.vast)
    except ValidationError as exc:
        raise SpecError(_format_validation(where.path, where.lines, exc, prefix=("vast",))) from None


def spec_yaml(plan: Plan, git: dict) -> str:
    """The resolved spec written to runs/<run_id>/spec.yaml, with the code it ran."""
    document = {"source": str(plan.path), "git": git, **plan.resolved}
    return yaml.safe_dump(document, sort_keys=False)


def json_schema() -> dict:
    from orchestrator.backends.vast.config import VastConfig

    schema = Study.model_json_schema()
    schema["properties"]["vast"] = {**VastConfig.model_json_schema(),
                                    "description": schema["properties"]["vast"]["description"]}
    return schema
