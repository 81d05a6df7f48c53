"""Find a trainer module under trainers/ and what the orchestrator needs to know about it."""

from __future__ import annotations

import difflib
import importlib
import json
from dataclasses import dataclass, field
from types import ModuleType

from pydantic import BaseModel

from orchestrator.errors import SpecError
from orchestrator.paths import REPO_ROOT


@dataclass
class Upstream:
    """A config field holding another trainer's config, whose output folder goes into `dir_field`."""
    trainer: str
    dir_field: str
    scope: str = "arm"                # "arm": trained per arm config; "study": one per seed shared by all arms


@dataclass
class TrainerInfo:
    name: str
    module: ModuleType
    config_cls: type[BaseModel]
    metrics: dict[str, str]           # summary metric -> "min" | "max"
    upstream: dict[str, Upstream]     # config field -> its upstream trainer
    seed_randomises: list[str] = field(default_factory=list)   # what a replicate's seed changes (SEED_RANDOMISES)
    samples_image: str = "samples"    # the grid the report shows: samples/<name>.png and <name>_stepNNNNNN.png
    # metric -> (what degenerate output flatters it, guard metrics an arm called better must not be worse on)
    flattered_by: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    measured_in: dict[str, str] = field(default_factory=dict)  # metric -> config field of the upstream whose space
                                                               # it is measured in (MEASURED_IN)

    def caveat(self, metric: str) -> str | None:
        """What a study ranking arms by `metric` should know, in one sentence; None when nothing."""
        parts = []
        if metric in self.flattered_by:
            what, guards = self.flattered_by[metric]
            parts.append(f"{metric} is flattered by {what}; an arm called better on it must not be worse on "
                         f"{' or '.join(guards)}")
        if metric in self.measured_in:
            field_name = self.measured_in[metric]
            parts.append(f"{metric} is measured in the {field_name}'s own space, so arms that change the {field_name} "
                         f"get no verdict on it")
        return "; ".join(parts) or None


def metric_caveat(trainers, metric: str) -> str | None:
    """The first caveat any of `trainers` (TrainerInfo) declares for `metric`; None when none does."""
    return next((caveat for info in trainers if (caveat := info.caveat(metric))), None)


def measuring_upstream(trainers, metric: str) -> tuple[str, str] | None:
    """(config field, its dir field) of the upstream in whose space `metric` is measured (MEASURED_IN); None when
    it is measured on the trainer's own output."""
    for info in trainers:
        name = info.measured_in.get(metric)
        if name is not None and name in info.upstream:
            return name, info.upstream[name].dir_field
    return None


def arms_on_other_upstreams(arm_runs: list[dict], baseline: str, dir_field: str) -> set[str]:
    """Arms (from ledger arm_runs rows) whose seed k uses another run of the upstream in `dir_field` than the
    baseline's seed k: a metric measured in that upstream's space cannot compare them with the baseline."""
    def used(row):
        return json.loads(row["upstream_ids"] or "{}").get(dir_field)
    theirs = {row["seed"]: used(row) for row in arm_runs if row["arm"] == baseline and row["kind"] == "arm"}
    return {row["arm"] for row in arm_runs if row["kind"] == "arm" and row["arm"] != baseline
            and row["seed"] in theirs and used(row) != theirs[row["seed"]]}


def available_trainers() -> list[str]:
    names = []
    for file in sorted((REPO_ROOT / "trainers").glob("*.py")):
        if file.stem.startswith("_"):
            continue
        if "class Config" in file.read_text() and "METRICS" in file.read_text():
            names.append(file.stem)
    return names


def load_trainer(name: str, where: str = "trainer") -> TrainerInfo:
    known = available_trainers()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise SpecError(f"{where}: unknown trainer {name!r}; available: {', '.join(known)}{hint}")
    module = importlib.import_module(f"trainers.{name}")
    upstream = {field: Upstream(link["trainer"], link["dir_field"], link.get("scope", "arm"))
                for field, link in getattr(module, "UPSTREAM", {}).items()}
    return TrainerInfo(name, module, module.Config, dict(module.METRICS), upstream,
                       list(getattr(module, "SEED_RANDOMISES", [])), getattr(module, "SAMPLES_IMAGE", "samples"),
                       dict(getattr(module, "FLATTERED_BY", {})), dict(getattr(module, "MEASURED_IN", {})))
