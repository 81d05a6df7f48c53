"""Every dashboard query and template variable, run against a real Prometheus scraping the real exporter;
a study's exporter and the standalone one scraped through the shipped prometheus.yml without a series twice;
the alert rules through promtool; the dashboards import anywhere ($datasource, __inputs); the compose and
provisioning files agree with each other."""

import json
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import STUDY_METRICS_PORTS
from orchestrator.telemetry.exporter import DEFAULT_PORT, METRICS, Exporter
from tests.prom_helpers import (
    HOT_HOST, NO_PROMETHEUS_REASON, PROMETHEUS, PROMTOOL, PrometheusServer, build_demo_ledger, free_port, promtool,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((REPO_ROOT / "dashboards").glob("*.json"))
INFRA = REPO_ROOT / "infra"
RULES = INFRA / "prometheus" / "rules.yml"
PROMETHEUS_YML = INFRA / "prometheus" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}     # what every panel, target and query variable uses

# What Grafana puts in place of its built-in variables, for a 1 s scrape interval.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval_ms": "15000", "$__interval": "15s",
                    "$__range_s": "3600", "$__range_ms": "3600000", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")
REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")

requires_prometheus = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL), reason=NO_PROMETHEUS_REASON)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return found


def query_variables(dashboard: dict) -> list[dict]:
    return [v for v in dashboard["templating"]["list"] if v["type"] != "datasource"]


def variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, replacement in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, replacement)
    for name, replacement in values.items():
        expr = re.sub(r"\$\{" + name + r"(?::\w+)?\}|\$" + name + r"\b", lambda _: replacement, expr)
    assert "$" not in expr, f"unresolved variable in {expr!r}"
    return expr


def resolve_variables(prometheus: PrometheusServer, dashboard: dict) -> dict[str, str]:
    """Each variable's values through the label values API (earlier variables substituted, as Grafana
    does); the value used is what selecting "All" gives: allValue, or every value as a regex alternation."""
    chosen: dict[str, str] = {}
    for variable in query_variables(dashboard):
        match = LABEL_VALUES.match(variable_query(variable))
        assert match, f"{dashboard['title']}: variable {variable['name']} is not a label_values() query"
        selector = match["selector"] and substitute(match["selector"], chosen)
        values = prometheus.label_values(match["label"], selector)
        assert values, f"{dashboard['title']}: variable {variable['name']} ({variable_query(variable)}) has no values"
        if variable.get("includeAll") and variable.get("allValue"):
            chosen[variable["name"]] = variable["allValue"]
        elif variable.get("includeAll"):
            chosen[variable["name"]] = "(" + "|".join(REGEX_SPECIAL.sub(r"\\\1", v) for v in values) + ")"
        else:
            chosen[variable["name"]] = values[0]
    return chosen


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    if not (PROMETHEUS and PROMTOOL):
        pytest.skip(NO_PROMETHEUS_REASON)
    workdir = tmp_path_factory.mktemp("prometheus")
    demo = build_demo_ledger(workdir / "ledger.sqlite")
    exporter = Exporter(demo.path, host="orchestrator-box", port=0).start()
    try:
        with PrometheusServer(workdir, [f"127.0.0.1:{exporter.port}"], rule_files=[RULES]) as server:
            server.wait_for_scrapes(count=3)
            yield server
    finally:
        exporter.stop()


def test_there_are_three_dashboards():
    assert [p.name for p in DASHBOARDS] == ["ablation.json", "cost.json", "gpu_health.json"]
    assert sorted(load(p)["title"] for p in DASHBOARDS) == ["Ablation", "Cost", "GPU health"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path):
    dashboard = load(path)
    assert dashboard["uid"].startswith("armature-")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            for name in re.findall(r"\barmature_\w+", target["expr"]):
                assert name in METRICS, f"{panel['title']}: {name} is not a series the exporter serves"
    for variable in query_variables(dashboard):
        assert variable["datasource"] == DATASOURCE, variable["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_imports_into_any_grafana(path):
    """No data source uid is hard-coded: a `datasource` variable (first, so the others can use it) picks any
    Prometheus, and __inputs makes Grafana's import ask which one (its answer becomes the variable's default)."""
    dashboard = load(path)
    first = dashboard["templating"]["list"][0]
    assert (first["type"], first["name"], first["query"]) == ("datasource", "datasource", "prometheus")
    (data_input,) = dashboard["__inputs"]
    assert (data_input["type"], data_input["pluginId"]) == ("datasource", "prometheus")
    assert first["current"]["value"] == "${" + data_input["name"] + "}"
    uids = re.findall(r'"uid":\s*"([^"]*)"', path.read_text())
    assert set(uids) <= {"${datasource}", "-- Grafana --", dashboard["uid"]}, set(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_can_be_narrowed_to_a_job_and_an_exporter(path):
    """Where several Prometheus jobs or exporters carry armature series, the job and instance variables pick."""
    dashboard = load(path)
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[:3] == ["datasource", "job", "instance"]
    exprs = [variable_query(v) for v in query_variables(dashboard)[2:]]
    exprs += [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]
    for expr in exprs:
        for name, selector in re.findall(r"\b(armature_\w+)(\{[^}]*\})?", expr):
            assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, f"{name} in {expr}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_legends_of_arm_runs_name_the_run(path):
    """With several studies selected, a curve labelled only by arm and seed would be ambiguous."""
    for panel in panels(load(path)):
        for target in panel["targets"]:
            legend = target.get("legendFormat", "")
            if "{{arm}}" in legend or "{{seed}}" in legend:
                assert "{{run}}" in legend, f"{panel['title']}: {legend}"


@requires_prometheus
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_returns_data(prometheus, path):
    dashboard = load(path)
    values = resolve_variables(prometheus, dashboard)
    empty = []
    checked = 0
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            if not prometheus.query(expr):
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
            checked += 1
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert checked >= 10


@requires_prometheus
def test_variables_narrow_down(prometheus):
    """A concrete selection works too: the hot GPU's run, host and GPU."""
    dashboard = load(REPO_ROOT / "dashboards" / "gpu_health.json")
    temperature = next(p for p in panels(dashboard) if p["title"] == "Temperature")
    expr = substitute(temperature["targets"][0]["expr"],
                      {"job": "armature", "instance": ".*", "run": "abl-demo", "host": HOT_HOST, "gpu": "0"})
    (series,) = prometheus.query(expr)
    assert float(series["value"][1]) == 91.0


@requires_prometheus
def test_prometheus_loads_the_rules_and_they_evaluate(prometheus):
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} >= {"ArmatureGpuOverheating", "ArmatureArmStalled", "ArmatureInstanceIdle",
                                                "ArmatureSpendNearBudget", "ArmatureBudgetExceeded",
                                                "ArmatureExporterDown"}
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    # The demo's 91 °C GPU and its idle instance are pending (their `for` has not passed yet).
    pending = {(a["metric"]["alertname"], a["metric"].get("host") or a["metric"].get("instance_id"))
               for a in prometheus.query('ALERTS{alertstate="pending"}')}
    assert ("ArmatureGpuOverheating", HOT_HOST) in pending
    assert ("ArmatureInstanceIdle", "30002") in pending


@requires_prometheus
def test_promtool_checks_rules_and_runs_their_unit_tests():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules_test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool("check", "config", str(INFRA / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_rules_use_only_exported_series():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\barmature_\w+", rule["expr"]):
                assert name in METRICS, f"{rule['alert']}: {name}"


def test_rules_test_covers_every_alert():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((RULES.parent / "rules_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == alerts and quiet == alerts


def test_compose_prometheus_and_grafana_files_agree():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    mounts = {}
    for service in compose["services"].values():
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (INFRA / source).exists(), source
                mounts[(INFRA / source).resolve()] = target

    prometheus_config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    config_target = mounts[(INFRA / "prometheus" / "prometheus.yml").resolve()]
    for rule_file in prometheus_config["rule_files"]:
        assert mounts[(INFRA / "prometheus" / rule_file).resolve()] == str(Path(config_target).parent / rule_file)
    (scrape,) = prometheus_config["scrape_configs"]
    targets = {target: group["labels"]["exporter"] for group in scrape["static_configs"] for target in group["targets"]}
    assert targets == {f"127.0.0.1:{DEFAULT_PORT}": "standalone",
                       **{f"127.0.0.1:{port}": "study" for port in STUDY_METRICS_PORTS}}

    dashboards_provider = yaml.safe_load(
        (INFRA / "grafana" / "provisioning" / "dashboards" / "armature.yml").read_text())["providers"][0]
    assert dashboards_provider["options"]["path"] == mounts[(REPO_ROOT / "dashboards").resolve()]
    assert mounts[(INFRA / "grafana" / "provisioning").resolve()] == "/etc/grafana/provisioning"

    (datasource,) = yaml.safe_load(
        (INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["uid"] == "prometheus"
    listen = next(arg for arg in compose["services"]["prometheus"]["command"] if arg.startswith("--web.listen"))
    assert datasource["url"] == "http://" + listen.split("=", 1)[1]


# ---- a study's exporter beside the standalone one, through the shipped prometheus.yml ------------------------


# Series about the exporter itself: each exporter has its own (told apart by `instance`).
PER_EXPORTER_SERIES = {"armature_exporter_scrape_duration_seconds", "armature_ledger_up", "armature_nvml_up",
                       "armature_nvml_unavailable_info"}


def shipped_scrape_configs(ports: dict[int, int]) -> list[dict]:
    """infra/prometheus/prometheus.yml's scrape configs, each exporter port moved to where this test listens."""
    configs = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    for config in configs:
        for group in config["static_configs"]:
            group["targets"] = [f"127.0.0.1:{ports[int(t.rsplit(':', 1)[1])]}" for t in group["targets"]]
    return configs


@pytest.fixture(scope="module")
def study_and_standalone(tmp_path_factory):
    """The demo ledger's running run abl-demo (driven by this process) served by its study's exporter, the
    finished abl-old by the standalone exporter; Prometheus scrapes both through the shipped config."""
    if not (PROMETHEUS and PROMTOOL):
        pytest.skip(NO_PROMETHEUS_REASON)
    workdir = tmp_path_factory.mktemp("prometheus-two-exporters")
    demo = build_demo_ledger(workdir / "ledger.sqlite")
    standalone = Exporter(demo.path, host="orchestrator-box", port=0, skip_live_runs=True).start()
    study = Exporter(demo.path, host="orchestrator-box", port=0, only_run=demo.run_id).start()
    ports = {DEFAULT_PORT: standalone.port, STUDY_METRICS_PORTS[0]: study.port}
    ports.update({port: free_port() for port in STUDY_METRICS_PORTS[1:]})       # studies not running: nothing there
    try:
        with PrometheusServer(workdir, [f"127.0.0.1:{standalone.port}", f"127.0.0.1:{study.port}"],
                              rule_files=[RULES], scrape_configs=shipped_scrape_configs(ports)) as server:
            server.wait_for_scrapes(count=3)
            yield server, demo, f"127.0.0.1:{study.port}", f"127.0.0.1:{standalone.port}"
    finally:
        standalone.stop()
        study.stop()


@requires_prometheus
def test_two_exporters_serve_no_series_twice(study_and_standalone):
    server, demo, study_target, standalone_target = study_and_standalone
    series = server.api("series", **{"match[]": '{__name__=~"armature_.+"}'})
    seen: dict[tuple, str] = {}
    for labels in series:
        if labels["__name__"] in PER_EXPORTER_SERIES:
            continue
        key = tuple(sorted((k, v) for k, v in labels.items() if k not in ("instance", "exporter")))
        assert key not in seen, f"{dict(key)} from both {seen[key]} and {labels['instance']}"
        seen[key] = labels["instance"]
        if labels.get("run") == demo.run_id:
            assert labels["instance"] == study_target, labels
        elif labels.get("run"):
            assert labels["instance"] == standalone_target, labels
    assert {labels.get("run") for labels in series} >= {demo.run_id, demo.old_run_id}


@requires_prometheus
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_of_one_study_return_only_its_series(study_and_standalone, path):
    server, demo, _, _ = study_and_standalone
    dashboard = load(path)
    values = {**resolve_variables(server, dashboard), "run": demo.run_id}
    answered = 0
    for panel in panels(dashboard):
        for target in panel["targets"]:
            result = server.query(substitute(target["expr"], values))
            runs = {series["metric"]["run"] for series in result if "run" in series["metric"]}
            assert runs <= {demo.run_id}, f"{panel['title']}: {runs}"
            curves = [tuple(sorted((k, v) for k, v in series["metric"].items() if k not in ("instance", "exporter")))
                      for series in result if series["metric"].get("__name__") not in PER_EXPORTER_SERIES]
            assert len(curves) == len(set(curves)), f"{panel['title']}: a curve twice: {sorted(curves)}"
            answered += bool(runs)
    assert answered >= 3


# ---- training curves against the step ------------------------------------------------------------------------


def step_panels(dashboard: dict) -> list[dict]:
    return [panel for panel in panels(dashboard) if panel["type"] == "trend"]


def test_training_panels_draw_against_the_step():
    """The panels about training (loss, primary metric) put the step on x: a Trend panel whose x field is the
    step series, joined with the curve's series on time and split into one curve per run, arm and seed."""
    dashboard = load(REPO_ROOT / "dashboards" / "ablation.json")
    by_title = {panel["title"]: panel for panel in step_panels(dashboard)}
    assert set(by_title) == {"Loss against step", "Primary metric against step"}
    for title, panel in by_title.items():
        assert panel["options"]["xField"] == "step"
        refs = {target["refId"]: target for target in panel["targets"]}
        assert all(t["format"] == "table" and t["range"] for t in refs.values()), title
        transforms = [t["id"] for t in panel["transformations"]]
        assert transforms == ["merge", "organize", "sortBy", "partitionByValues"], title
        renamed = panel["transformations"][1]["options"]["renameByName"]
        step_ref = next(ref for ref, t in refs.items() if "armature_arm_step{" in t["expr"])
        assert renamed[f"Value #{step_ref}"] == "step"
        curve_ref = next(ref for ref in refs if ref != step_ref)
        assert ("loss" if title.startswith("Loss") else "primary metric") == renamed[f"Value #{curve_ref}"]
        assert panel["transformations"][3]["options"]["fields"] == ["run", "arm", "seed"]
    assert any(r["id"] == "trend" for r in dashboard["__requires"])


@requires_prometheus
def test_step_and_curve_series_join_row_for_row(prometheus):
    """Merged on time and labels, the two queries of a step panel pair up: the same run/arm/seed label sets with
    nothing else (no __name__, job or instance to keep rows apart), sampled at the same times."""
    dashboard = load(REPO_ROOT / "dashboards" / "ablation.json")
    values = resolve_variables(prometheus, dashboard)
    end = float(prometheus.query("time()")[0]["value"][1])
    for panel in step_panels(dashboard):
        answers = []
        for target in panel["targets"]:
            data = prometheus.api("query_range", query=substitute(target["expr"], values), start=str(end - 30),
                                  end=str(end), step="1")
            answers.append({tuple(sorted(series["metric"].items())): [t for t, _ in series["values"]]
                            for series in data["result"]})
        steps, curve = answers
        assert steps and curve and set(curve) <= set(steps), panel["title"]
        for labels, times in curve.items():
            assert {name for name, _ in labels} == {"run", "arm", "seed"}, labels
            assert set(times) <= set(steps[labels]), labels
