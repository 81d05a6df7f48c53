"""Cost model, reconciliation, estimates and the `armature cost` report, on crafted ledgers with known answers."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from datetime import datetime

import pytest

from orchestrator.cost import (Rates, burn_rate, cost_command, cost_lines, current_spend, estimate_study,
                               fetch_provider_charges, local_dollars_per_hour, reconcile, record_estimate)
from orchestrator.errors import UserError
from orchestrator.ledger import Ledger

T = datetime(2026, 3, 10, 12, 0).timestamp()   # a fixed local noon
H = 3600.0
LATER = T + 100 * H                            # "now" for every test: long after everything below
RATES = Rates(dollars_per_kwh=0.30)


# ---- building crafted ledgers ------------------------------------------------------------------

@pytest.fixture
def ledger(tmp_path):
    opened = Ledger(tmp_path / "ledger.sqlite")
    yield opened
    opened.close()


def add_run(ledger, run_id, *, backend="vast", created_at=T, name=None):
    ledger.create_run(run_id, name=name or f"study-{run_id}", trainer="maskgit", backend=backend, spec_path=None,
                      metric=None, metric_mode=None, baseline=None, budget_dollars=None, git_commit=None,
                      git_diff_hash=None)
    with ledger.write() as db:
        db.execute("UPDATE runs SET created_at = ? WHERE run_id = ?", (created_at, run_id))


def add_arm(ledger, run_id, arm, *, seed=0, gpus=1.0, kind="arm", cpus=1):
    return ledger.add_arm_run(run_id, arm=arm, seed=seed, kind=kind, config={}, config_hash="h", out_dir="out",
                              total_steps=10, gpus=gpus, cpus=cpus, gpu_memory_gb=None)


def add_instance(ledger, run_id, *, num_gpus=1, dph=1.0, created=T, ready=None, destroyed=None,
                 provider_id="1001", state=None):
    instance_id = ledger.add_instance(run_id=run_id, provider="vast", label=f"armature:{run_id}", num_gpus=num_gpus,
                                      dph_total=dph)
    ledger.update_instance(instance_id, provider_instance_id=provider_id, created_at=created,
                           ready_at=created if ready is None else ready, destroyed_at=destroyed,
                           state=state or ("destroyed" if destroyed is not None else "ready"))
    return instance_id


def add_attempt(ledger, arm_run_id, *, start, end=None, state="succeeded", instance_id=None, backend="vast",
                energy=None, running_at=None):
    attempt_id = ledger.start_attempt(arm_run_id, backend=backend, instance_id=instance_id)
    ledger.update_attempt(attempt_id, started_at=start, ended_at=end, state=state if end is not None else "running",
                          energy_joules=energy)
    if running_at is not None:
        with ledger.write() as db:
            db.execute("INSERT INTO transitions(arm_run_id, attempt_id, from_state, to_state, at)"
                       " VALUES (?, ?, 'deploying', 'running', ?)", (arm_run_id, attempt_id, running_at))
    return attempt_id


def lines_by(ledger, run_ids=None, **kw):
    return cost_lines(ledger, run_ids, now=LATER, rates=RATES, **kw)


def one(lines, **match):
    found = [line for line in lines if all(getattr(line, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


@pytest.fixture
def shared(ledger):
    """Two arms on one 2-GPU instance at $1/h for 2 h: $1 each."""
    add_run(ledger, "r1")
    instance = add_instance(ledger, "r1", num_gpus=2, dph=1.0, created=T, destroyed=T + 2 * H)
    for arm in ("a", "b"):
        add_attempt(ledger, add_arm(ledger, "r1", arm), start=T, end=T + 2 * H, instance_id=instance)
    return ledger


# ---- the cost model --------------------------------------------------------------------------

def test_two_arms_share_an_instance_by_gpu(shared):
    lines = lines_by(shared)
    assert {line.arm: round(line.dollars, 6) for line in lines} == {"a": 1.0, "b": 1.0}
    assert all(not line.waste and line.gpu_hours == pytest.approx(2.0) for line in lines)
    assert current_spend(shared, "r1", now=LATER, rates=RATES) == pytest.approx(2.0)
    assert burn_rate(shared) == 0


def test_preempted_attempt_is_waste(ledger):
    add_run(ledger, "r1")
    arm = add_arm(ledger, "r1", "a")
    first = add_instance(ledger, "r1", dph=2.0, created=T, destroyed=T + H, provider_id="1")
    second = add_instance(ledger, "r1", dph=2.0, created=T + H, destroyed=T + 3 * H, provider_id="2")
    add_attempt(ledger, arm, start=T, end=T + H, state="preempted", instance_id=first)
    add_attempt(ledger, arm, start=T + H, end=T + 3 * H, instance_id=second)
    lines = lines_by(ledger)
    preempted = one(lines, kind="preempted")
    assert preempted.waste and preempted.dollars == pytest.approx(2.0) and preempted.attempt_n == 1
    assert one(lines, kind="run").dollars == pytest.approx(4.0)
    data = json.loads(cost_command(ledger, fmt="json", now=LATER, rates=RATES))
    assert data["total"]["dollars"] == pytest.approx(6.0)
    assert data["total"]["waste_dollars"] == pytest.approx(2.0)
    assert data["headline"] == "1 experiment for $6.00 (waste $2.00, 33%)"


def test_instance_destroyed_late_is_idle_waste_and_boot_is_waste(ledger):
    add_run(ledger, "r1")
    instance = add_instance(ledger, "r1", dph=1.0, created=T, ready=T + 0.25 * H, destroyed=T + 1.75 * H)
    add_attempt(ledger, add_arm(ledger, "r1", "a"), start=T, end=T + 1.25 * H, instance_id=instance)
    lines = lines_by(ledger)
    assert one(lines, kind="boot").dollars == pytest.approx(0.25)
    assert one(lines, kind="run").dollars == pytest.approx(1.0)       # clipped to the ready instance
    assert one(lines, kind="idle").dollars == pytest.approx(0.5)
    assert sum(line.dollars for line in lines) == pytest.approx(1.75)   # lines add up to $/h x lifetime
    assert sum(line.dollars for line in lines if line.waste) == pytest.approx(0.75)


def test_half_used_instance_and_deploy_time(ledger):
    add_run(ledger, "r1")
    instance = add_instance(ledger, "r1", num_gpus=2, dph=2.0, created=T, destroyed=T + 2 * H)
    add_attempt(ledger, add_arm(ledger, "r1", "a"), start=T, end=T + 2 * H, instance_id=instance,
                running_at=T + 0.5 * H)
    lines = lines_by(ledger)
    assert one(lines, kind="deploy").dollars == pytest.approx(0.5) and one(lines, kind="deploy").waste
    assert one(lines, kind="run").dollars == pytest.approx(1.5)
    assert one(lines, kind="idle").dollars == pytest.approx(2.0)      # the second GPU, unused for 2 h


def test_a_fractional_gpu_on_a_rented_instance_is_costed_as_the_whole_gpu_it_holds(ledger):
    """Vast rents whole GPUs: an arm asking for 0.25 holds GPU 0 of its instance alone and pays all of it
    (it used to be charged a quarter, with three quarters reported idle)."""
    add_run(ledger, "r1")
    instance = add_instance(ledger, "r1", num_gpus=2, dph=2.0, created=T, destroyed=T + H)
    on_gpu0 = add_attempt(ledger, add_arm(ledger, "r1", "a", gpus=0.25), start=T, end=T + H, instance_id=instance)
    ledger.update_attempt(on_gpu0, gpu_index="0")
    add_attempt(ledger, add_arm(ledger, "r1", "b", gpus=0.5), start=T, end=T + H, instance_id=instance)
    lines = lines_by(ledger)
    assert one(lines, arm="a").dollars == pytest.approx(1.0) and one(lines, arm="a").gpu_hours == pytest.approx(1.0)
    assert one(lines, arm="b").dollars == pytest.approx(1.0) and one(lines, arm="b").gpu_hours == pytest.approx(1.0)
    assert not [line for line in lines if line.kind == "idle"]


def test_oversubscribed_instance_splits_its_price(ledger):
    add_run(ledger, "r1")
    instance = add_instance(ledger, "r1", num_gpus=1, dph=3.0, created=T, destroyed=T + H)
    for arm in ("a", "b", "c"):
        add_attempt(ledger, add_arm(ledger, "r1", arm, gpus=1), start=T, end=T + H, instance_id=instance)
    assert sorted(round(line.dollars, 6) for line in lines_by(ledger)) == [1.0, 1.0, 1.0]


def test_still_running_instance_priced_to_now(ledger):
    add_run(ledger, "r1")
    instance = add_instance(ledger, "r1", dph=0.5, created=T)
    add_attempt(ledger, add_arm(ledger, "r1", "a"), start=T, instance_id=instance)
    assert current_spend(ledger, "r1", now=T + 4 * H, rates=RATES) == pytest.approx(2.0)
    assert burn_rate(ledger) == pytest.approx(0.5) and burn_rate(ledger, "r1") == pytest.approx(0.5)
    assert burn_rate(ledger, "other") == 0
    text = cost_command(ledger, now=T + 4 * H, rates=RATES, console_width=120)
    assert "still running" in text and "$2.00" in text


def test_failed_create_costs_nothing(ledger):
    add_run(ledger, "r1")
    instance = ledger.add_instance(run_id="r1", provider="vast", label="x", num_gpus=1, dph_total=1.0)
    ledger.update_instance(instance, state="failed", created_at=T)
    assert lines_by(ledger) == []
    assert current_spend(ledger, "r1", now=LATER) == 0 and burn_rate(ledger) == 0


def test_local_energy_and_machine_time(ledger):
    add_run(ledger, "loc", backend="local")
    add_attempt(ledger, add_arm(ledger, "loc", "measured"), start=T, end=T + H, backend="local", energy=3.6e6)
    add_attempt(ledger, add_arm(ledger, "loc", "blind"), start=T, end=T + H, backend="local")
    rates = Rates(dollars_per_kwh=0.30, machine_dollars_per_hour=0.20, machine_cpus=4)
    lines = cost_lines(ledger, now=LATER, rates=rates)
    measured = one(lines, arm="measured")
    assert measured.dollars == pytest.approx(0.30) and measured.priced_by == "energy"
    blind = one(lines, arm="blind")     # a GPU attempt without NVML: the whole machine's time
    assert blind.dollars == pytest.approx(0.20) and blind.priced_by == "machine time"
    assert current_spend(ledger, "loc", now=LATER, rates=rates) == pytest.approx(0.50)
    text = cost_command(ledger, now=LATER, rates=rates, console_width=160, detail=True)
    assert "unknown" not in text and "Total: $0.50" in text and "#1 run (machine time)" in text
    assert "x $0.20/h (ARMATURE_MACHINE_DOLLARS_PER_HOUR)" in text and "/ 4 cores" in text
    hardware = Rates(dollars_per_kwh=0.30, hardware_dollars_per_gpu_hour=1.0)
    assert one(cost_lines(ledger, now=LATER, rates=hardware), arm="measured").dollars == pytest.approx(1.30)


CPU_RATES = Rates(dollars_per_kwh=0.30, machine_dollars_per_hour=0.20, machine_cpus=4)


@pytest.fixture
def cpu_study(ledger):
    """A local CPU study on a 4-core machine at $0.20/h: one arm on 2 CPUs lost an attempt of 113 s and failed
    one of an hour before succeeding in an hour; one arm on 4 CPUs ran 2 h with a RAPL reading of 1.8 MJ."""
    add_run(ledger, "cpu", backend="local")
    retried = add_arm(ledger, "cpu", "retried", gpus=0, cpus=2)
    add_attempt(ledger, retried, start=T, end=T + 113, state="lost", backend="local")
    add_attempt(ledger, retried, start=T + 200, end=T + 200 + H, state="failed", backend="local")
    add_attempt(ledger, retried, start=T + 2 * H, end=T + 3 * H, backend="local")
    add_attempt(ledger, add_arm(ledger, "cpu", "rapl", gpus=0, cpus=4), start=T, end=T + 2 * H, backend="local",
                energy=1.8e6)
    return ledger


LOST = 113 / H * 0.5 * 0.20       # wall hours x 2 of 4 cores x $0.20/h
FAILED = 1 * 0.5 * 0.20
SUCCEEDED = 1 * 0.5 * 0.20
RAPL = 1.8e6 / 3.6e6 * 0.30       # 0.5 kWh at $0.30


def test_cpu_study_priced_by_machine_time_and_energy_with_known_answers(cpu_study):
    lines = cost_lines(cpu_study, now=LATER, rates=CPU_RATES)
    assert one(lines, attempt_state="lost").dollars == pytest.approx(LOST) and one(lines, attempt_state="lost").waste
    assert one(lines, attempt_state="failed").dollars == pytest.approx(FAILED)
    assert one(lines, arm="rapl").dollars == pytest.approx(RAPL) and one(lines, arm="rapl").priced_by == "energy"
    total = LOST + FAILED + SUCCEEDED + RAPL
    assert current_spend(cpu_study, "cpu", now=LATER, rates=CPU_RATES) == pytest.approx(total)

    data = json.loads(cost_command(cpu_study, fmt="json", now=LATER, rates=CPU_RATES))
    assert data["total"]["dollars"] == pytest.approx(total, abs=1e-6) and data["total"]["unknown_lines"] == 0
    assert data["studies"][0]["dollars"] == pytest.approx(total, abs=1e-6)
    assert data["total"]["waste_dollars"] == pytest.approx(LOST + FAILED, abs=1e-6)     # JSON keeps 6 decimals
    retried = next(g for g in data["studies"][0]["groups"] if g["label"] == "retried")
    assert retried["waste_dollars"] == pytest.approx(LOST + FAILED, abs=1e-6)
    assert retried["hours"] == pytest.approx(2 + 113 / H, abs=1e-6)
    money = f"${total:.2f}"
    assert data["headline"].startswith(f"2 experiments for {money} (waste ${LOST + FAILED:.2f}")

    table = cost_command(cpu_study, now=LATER, rates=CPU_RATES, console_width=160)   # headline, study, total agree
    assert table.startswith(f"2 experiments for {money}") and f"Total: {money}" in table
    study_total = next(line for line in table.splitlines() if line.strip().startswith("total"))
    assert money in study_total and "unknown" not in table
    rows = list(csv.DictReader(io.StringIO(cost_command(cpu_study, fmt="csv", now=LATER, rates=CPU_RATES))))
    assert float(next(r for r in rows if r["row"] == "total")["dollars"]) == pytest.approx(total)
    assert float(next(r for r in rows if r["row"] == "study")["dollars"]) == pytest.approx(total)


def test_rapl_meter_sums_packages_across_a_wrap(tmp_path):
    from orchestrator.cost.energy import RaplMeter, cpu_share
    for zone, value in (("intel-rapl:0", 900), ("intel-rapl:1", 100)):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text(f"{value}\n")
        (tmp_path / zone / "max_energy_range_uj").write_text("1000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()            # a sub-zone (core) is inside its package: not counted
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    meter = RaplMeter(tmp_path, sample_seconds=None)
    assert meter.available and meter.joules() == 0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("200\n")   # wrapped: 900 -> 1000 -> 200 = 300 uj
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("150\n")
    assert meter.joules() == pytest.approx(350e-6)
    assert cpu_share(2, 8) == 0.25 and cpu_share(16, 8) == 1.0 and cpu_share(0, 8) == 1.0
    assert not RaplMeter(tmp_path / "absent", sample_seconds=None).available


# ---- reconciliation --------------------------------------------------------------------------

def _two_billed_instances(ledger):
    add_run(ledger, "r1")
    arm = add_arm(ledger, "r1", "a")
    off = add_instance(ledger, "r1", dph=1.0, created=T, destroyed=T + H, provider_id="11")
    near = add_instance(ledger, "r1", dph=1.0, created=T + H, destroyed=T + 2 * H, provider_id="12")
    add_attempt(ledger, arm, start=T, end=T + H, state="preempted", instance_id=off)
    add_attempt(ledger, arm, start=T + H, end=T + 2 * H, instance_id=near)
    ledger.add_charge(instance_id=off, run_id="r1", source="provider", amount_dollars=1.20)
    ledger.add_charge(instance_id=near, run_id="r1", source="provider", amount_dollars=1.01)
    return off, near


def test_reconcile_flags_twenty_percent_and_passes_one_percent(ledger):
    off, near = _two_billed_instances(ledger)
    checks = {c.instance_id: c for c in reconcile(ledger, "r1", now=LATER)}
    assert checks[off].flagged and checks[off].status == "MISMATCH"
    assert checks[off].relative_difference == pytest.approx(0.20)
    assert not checks[near].flagged and checks[near].status == "ok"
    assert checks[near].difference == pytest.approx(0.01)
    text = cost_command(ledger, now=LATER, console_width=140)
    assert "Billed vs estimate" in text and "MISMATCH" in text
    data = json.loads(cost_command(ledger, fmt="json", now=LATER))
    assert [c["flagged"] for c in data["reconciliation"]] == [True, False]


def test_reconcile_flags_a_small_bill_by_its_ratio_and_never_a_running_instance(ledger):
    add_run(ledger, "r1")
    tiny = add_instance(ledger, "r1", dph=0.01, created=T, destroyed=T + H, provider_id="1")
    close = add_instance(ledger, "r1", dph=0.001, created=T, destroyed=T + H, provider_id="3")
    live = add_instance(ledger, "r1", dph=1.0, created=T, provider_id="2")
    ledger.add_charge(instance_id=tiny, run_id="r1", source="provider", amount_dollars=0.015)   # +50%, half a cent
    ledger.add_charge(instance_id=close, run_id="r1", source="provider", amount_dollars=0.001009)   # +0.9%
    ledger.add_charge(instance_id=live, run_id="r1", source="provider", amount_dollars=0.10)
    checks = {c.instance_id: c for c in reconcile(ledger, now=LATER)}
    assert checks[tiny].flagged and checks[tiny].status == "MISMATCH"
    assert checks[tiny].reason.startswith("billed $0.0150 against $0.0100 expected"), checks[tiny].reason
    assert not checks[close].flagged and checks[close].status == "ok"
    assert not checks[live].flagged and checks[live].status == "still running"


class FakeCharges:
    """Serves `show_invoices_v1(charges=True)` pages the way the API shapes them."""

    def __init__(self, lines, page_size=1):
        self.lines, self.page_size, self.calls = lines, page_size, []

    def show_invoices_v1(self, **params):
        self.calls.append(params)
        offset = int(params.get("next_token") or 0)
        page = self.lines[offset:offset + self.page_size]
        more = offset + self.page_size < len(self.lines)
        return {"results": page, "count": len(page), "total": len(self.lines),
                "next_token": str(offset + self.page_size) if more else None}


def _charge_line(provider_id, amount, start=T, end=T + H):
    return {"type": "instance", "source": f"instance-{provider_id}", "amount": amount, "start": start, "end": end,
            "description": f"Instance {provider_id}", "items": [], "metadata": {}}


def test_fetch_provider_charges_matches_and_does_not_duplicate(ledger):
    start = time.time() - 3 * H          # recent: a bill fetched within a day of the destroy is not final yet
    add_run(ledger, "r1", created_at=start)
    first = add_instance(ledger, "r1", dph=1.0, created=start, destroyed=start + H, provider_id="501")
    second = add_instance(ledger, "r1", dph=1.0, created=start, destroyed=start + H, provider_id="502")
    client = FakeCharges([_charge_line(501, 1.0, start), _charge_line(999, 7.0, start),
                          _charge_line(502, 0.4, start), _charge_line(502, 0.6, start)])
    added = fetch_provider_charges(client, ledger, "r1")
    assert len(added) == 2 and len(client.calls) == 4                 # followed the pagination
    assert client.calls[0]["charges"] is True and client.calls[0]["start_date"] <= start
    assert fetch_provider_charges(client, ledger, "r1") == []
    billed = {c.instance_id: c.billed_dollars for c in reconcile(ledger, "r1")}
    assert billed == {first: pytest.approx(1.0), second: pytest.approx(1.0)}
    client.lines[0] = _charge_line(501, 1.25, start)                   # the bill grew: one adjustment row
    assert len(fetch_provider_charges(client, ledger, "r1")) == 1
    assert {c.instance_id: c.billed_dollars for c in reconcile(ledger, "r1")}[first] == pytest.approx(1.25)
    rows = ledger.query("SELECT COUNT(*) AS n FROM charges WHERE source = 'provider'")
    assert rows[0]["n"] == 3


def test_fetch_skips_settled_bills(ledger):
    add_run(ledger, "r1")
    settled = add_instance(ledger, "r1", dph=1.0, created=T, destroyed=T + H, provider_id="601")
    ledger.add_charge(instance_id=settled, run_id="r1", source="provider", amount_dollars=1.0)  # fetched days later
    client = FakeCharges([_charge_line(601, 5.0)])
    assert fetch_provider_charges(client, ledger, "r1") == [] and client.calls == []


# ---- estimates -------------------------------------------------------------------------------

def test_estimate_study_and_report_beside_actual(shared):
    estimate = estimate_study(4, 0.5, 0.40, 1)
    assert estimate.dollars == pytest.approx(0.80) and estimate.gpu_hours == pytest.approx(2.0)
    assert "= $0.80" in estimate.describe()
    assert local_dollars_per_hour(1, watts_per_gpu=1000, rates=RATES) == pytest.approx(0.30)
    assert local_dollars_per_hour(0, rates=CPU_RATES) == pytest.approx(0.20)     # a CPU arm: the machine's $/h
    with pytest.raises(UserError, match="hours"):
        estimate_study(4, -1, 0.4, 1)
    record_estimate(shared, "r1", estimate_study(2, 2.0, 0.40, 1))
    text = cost_command(shared, now=LATER, console_width=140)
    assert "estimate $1.60" in text and "actual $2.00 (+25%)" in text
    data = json.loads(cost_command(shared, fmt="json", now=LATER))
    assert data["studies"][0]["estimate"] == {"dollars": pytest.approx(1.6), "hours": pytest.approx(4.0)}


# ---- the report in every format ----------------------------------------------------------------

@pytest.fixture
def mixed(ledger):
    """A vast study (two arms on a shared instance, boot and idle) and a local study, on different days."""
    add_run(ledger, "vast1", created_at=T)
    instance = add_instance(ledger, "vast1", num_gpus=2, dph=1.0, created=T, ready=T + 0.5 * H, destroyed=T + 3 * H)
    for arm in ("lr-high", "lr-low"):
        add_attempt(ledger, add_arm(ledger, "vast1", arm), start=T + 0.5 * H, end=T + 2.5 * H, instance_id=instance)
    add_run(ledger, "local1", backend="local", created_at=T + 48 * H)
    add_attempt(ledger, add_arm(ledger, "local1", "base", gpus=1), start=T + 48 * H, end=T + 49 * H,
                backend="local", energy=7.2e6)
    return ledger
    # vast1: boot $0.50, arms $1.00 each, idle 0.5 h x 2 GPUs = $0.50 -> $3.00 (waste $1.00); local1: $0.60


def test_table_has_headline_groups_and_total(mixed):
    text = cost_command(mixed, now=LATER, rates=RATES, console_width=120)
    assert text.startswith("3 experiments for $3.60 (waste $1.00, 28%)")
    for expected in ("lr-high", "lr-low", "boot (overhead)", "idle (overhead)", "Total: $3.60", "$0.30/kWh"):
        assert expected in text
    detailed = cost_command(mixed, now=LATER, rates=RATES, console_width=120, detail=True)
    assert "seed 0 #1 run" in detailed and "instance 1 (vast 1001)" in detailed


def test_csv_parses_and_adds_up(mixed):
    rows = list(csv.DictReader(io.StringIO(cost_command(mixed, fmt="csv", now=LATER, rates=RATES))))
    total = next(r for r in rows if r["row"] == "total")
    assert float(total["dollars"]) == pytest.approx(3.60)
    groups = [r for r in rows if r["row"] in ("arm", "upstream", "overhead")]
    assert sum(float(r["dollars"]) for r in groups) == pytest.approx(3.60)
    assert {r["group"]: float(r["dollars"]) for r in groups if r["run_id"] == "vast1"} == {
        "lr-high": pytest.approx(1.0), "lr-low": pytest.approx(1.0), "boot": pytest.approx(0.5),
        "idle": pytest.approx(0.5)}
    assert float(next(r for r in rows if r["row"] == "study" and r["run_id"] == "vast1")["waste_dollars"]) == \
        pytest.approx(1.0)
    detail = list(csv.DictReader(io.StringIO(cost_command(mixed, fmt="csv", detail=True, now=LATER, rates=RATES))))
    assert sum(float(r["dollars"]) for r in detail if r["row"] == "line") == pytest.approx(3.60)


def test_json_parses_with_attempt_detail(mixed):
    data = json.loads(cost_command(mixed, fmt="json", now=LATER, rates=RATES))
    assert data["experiments"] == 3 and data["total"]["dollars"] == pytest.approx(3.6)
    vast = next(s for s in data["studies"] if s["run_id"] == "vast1")
    assert vast["dollars"] == pytest.approx(3.0) and vast["share"] == pytest.approx(3.0 / 3.6)
    arm = next(g for g in vast["groups"] if g["label"] == "lr-high")
    assert arm["lines"][0]["attempt_id"] and arm["lines"][0]["dollars"] == pytest.approx(1.0)


def test_markdown_table_rows(mixed):
    text = cost_command(mixed, fmt="markdown", now=LATER, rates=RATES)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    by_label = {row[0]: row for row in rows}
    assert rows[0] == ["Arm", "Attempts", "Hours", "GPU-h", "$/h", "Cost", "Waste", "Share"]
    assert by_label["lr-high"][5] == "$1.00" and by_label["base"][5] == "$0.60" and by_label["base"][2] == "1.00"
    assert by_label["boot (overhead)"][6] == "$0.50"
    assert [row[5] for row in rows if row[0] == "**total**"] == ["**$3.00**", "**$0.60**"]
    assert "**3 experiments for $3.60 (waste $1.00, 28%)**" in text


def test_filters(mixed):
    def run_ids(**kw):
        data = json.loads(cost_command(mixed, fmt="json", now=LATER, rates=RATES, **kw))
        return [s["run_id"] for s in data["studies"]]

    assert run_ids() == ["vast1", "local1"]
    assert run_ids(run="local1") == ["local1"]
    assert run_ids(backend="vast") == ["vast1"]
    assert run_ids(backend="local") == ["local1"]
    day = datetime.fromtimestamp(T).date()
    assert run_ids(until=day.isoformat()) == ["vast1"]                 # a bare day includes that whole day
    assert run_ids(since=datetime.fromtimestamp(T + 24 * H).strftime("%Y-%m-%d %H:%M")) == ["local1"]
    assert run_ids(since="99h") == ["local1"]                         # a span back from now
    assert run_ids(since="2030-01-01") == []
    assert "No runs match" in cost_command(mixed, since="2030-01-01", now=LATER)


def test_unowned_instance_is_reported(mixed):
    add_instance(mixed, None, dph=1.0, created=T, destroyed=T + H, provider_id="777")
    data = json.loads(cost_command(mixed, fmt="json", now=LATER, rates=RATES))
    assert data["studies"][-1]["run_id"] is None and data["studies"][-1]["dollars"] == pytest.approx(1.0)
    assert json.loads(cost_command(mixed, fmt="json", run="vast1", now=LATER))["total"]["dollars"] == \
        pytest.approx(3.0)


# ---- bad input -------------------------------------------------------------------------------

def test_unknown_run_id_names_it_and_lists_recent(mixed):
    with pytest.raises(UserError, match=r"'nope'.*recent runs: local1, vast1"):
        cost_command(mixed, run="nope")
    with pytest.raises(UserError, match="nope"):
        reconcile(mixed, "nope")


def test_empty_ledger(ledger):
    with pytest.raises(UserError, match="no runs yet"):
        cost_command(ledger)


@pytest.mark.parametrize("kw, message", [
    ({"since": "last tuesday"}, "--since 'last tuesday': not a date"),
    ({"until": "2026-13-45"}, "--until"),
    ({"since": "2026-03-10", "until": "2026-03-01"}, "not before"),
    ({"fmt": "xml"}, "--format 'xml'"),
    ({"backend": "gcp"}, "--backend 'gcp'"),
])
def test_bad_arguments(mixed, kw, message):
    with pytest.raises(UserError) as caught:
        cost_command(mixed, **kw)
    assert message in str(caught.value)


def test_old_schema_and_missing_and_corrupt_ledgers(tmp_path):
    old = tmp_path / "old.sqlite"
    Ledger(old).close()
    db = sqlite3.connect(old)
    db.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="older armature"):
        cost_command(old)
    with pytest.raises(UserError, match="no ledger here"):
        cost_command(tmp_path / "absent.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="cannot read"):
        cost_command(junk)


def test_rates_from_env(monkeypatch):
    monkeypatch.setenv("ARMATURE_DOLLARS_PER_KWH", "0.5")
    monkeypatch.setenv("ARMATURE_MACHINE_DOLLARS_PER_HOUR", "0.07")
    assert Rates.from_env().dollars_per_kwh == 0.5 and Rates.from_env().machine_dollars_per_hour == 0.07
    monkeypatch.setenv("ARMATURE_DOLLARS_PER_KWH", "cheap")
    with pytest.raises(UserError, match="ARMATURE_DOLLARS_PER_KWH"):
        Rates.from_env()


# ---- against the Vast simulator, through the real SDK -----------------------------------------

def test_reconcile_against_the_vast_simulator(tmp_path, ledger):
    import vastai
    from infra import vastsim
    from infra.vastsim.instances import find_sshd
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed (the simulator's instances run one)")
    price = 36.0    # $/h: a cent a second, so a few seconds of life are worth reconciling
    offers = [{"id": 1, "machine_id": 11, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": price,
               "boot_delay_s": 0.2}]
    add_run(ledger, "sim1", created_at=time.time())
    arm = add_arm(ledger, "sim1", "a")
    with vastsim.Simulator(tmp_path / "vastsim", api_key="cost-test-key", offers=offers) as sim:
        vast = vastai.VastAI(api_key="cost-test-key", server_url=sim.url)

        def rent(label):
            instance = ledger.add_instance(run_id="sim1", provider="vast", label=label, offer_id="1", num_gpus=1,
                                           dph_total=price)
            contract = vast.create_instance(1, image="pytorch/pytorch", disk=10, label=label,
                                            cancel_unavail=True)["new_contract"]
            ledger.update_instance(instance, provider_instance_id=str(contract), state="booting")
            deadline = time.monotonic() + 10
            while (vast.show_instance(contract) or {}).get("actual_status") != "running":
                assert time.monotonic() < deadline, "instance never ran"
                time.sleep(0.02)
            ledger.update_instance(instance, ready_at=time.time(), state="ready")
            return instance, contract, ledger.start_attempt(arm, backend="vast", instance_id=instance)

        def destroy(instance, contract):
            vast.destroy_instance(contract)
            assert vast.show_instance(contract) is None          # confirmed gone
            ledger.update_instance(instance, destroyed_at=time.time(), state="destroyed")

        faithful, faithful_contract, first = rent("armature:sim1:1")
        preempted, preempted_contract, second = rent("armature:sim1:2")
        time.sleep(0.5)
        sim.preempt(preempted_contract)                           # Vast stops billing the GPU of an exited box
        ledger.end_attempt(second, "preempted")
        time.sleep(2.5)
        ledger.end_attempt(first, "succeeded")
        destroy(faithful, faithful_contract)
        destroy(preempted, preempted_contract)

        added = fetch_provider_charges(vast, ledger, "sim1")
        assert len(added) == 2
        assert fetch_provider_charges(vast, ledger, "sim1") == []   # nothing changed: nothing duplicated

    checks = {c.instance_id: c for c in reconcile(ledger, "sim1")}
    # The faithful box is billed what the ledger estimates, to within a second of GPU ($0.01). It lives about
    # 3 s, so 1% is 33 ms: the 20-ms poll and API round trip that date `ready_at` can pass that on a busy
    # machine, and then the difference is flagged with that reason (any difference over 1% is).
    faithful_check = checks[faithful]
    assert faithful_check.estimated_dollars > 0.02 and abs(faithful_check.difference) < 0.01
    if abs(faithful_check.relative_difference) <= 0.01:
        assert not faithful_check.flagged and faithful_check.status == "ok"
    else:
        assert faithful_check.flagged and "by the poll that saw it" in faithful_check.reason, \
            faithful_check
    assert checks[preempted].flagged and checks[preempted].difference < -0.01
    text = cost_command(ledger, console_width=140)
    assert "Billed vs estimate" in text and "MISMATCH" in text


# ---- decisions (`--detail`): outbids, idle stops, excluded offers, early stops ----------------------

def test_cost_detail_lists_each_decision_from_the_emitters_events(ledger):
    from orchestrator import early_stop
    from orchestrator.backends.vast import idle, offers, outbid
    from orchestrator.cost import decisions

    # the report reads the kinds its emitters write
    assert (decisions.OUTBID, decisions.IDLE_STOPPED, decisions.EXCLUDED, decisions.STOPPED_EARLY) == (
        outbid.OUTBID_EVENT, idle.IDLE_EVENT, offers.EXCLUDED_EVENT, early_stop.STOP_EVENT)
    add_run(ledger, "d1")
    add_run(ledger, "other")
    ranked = offers.RankedOffers([{"id": 77, "machine_id": 901}], set())
    ranked.failed({"id": 77, "machine_id": 901}, "instance 5 not ready after 3s", ledger, "d1")
    ledger.event("d1", outbid.OUTBID_EVENT, instance_id=3, provider_instance_id="4242", action="wait",
                 wait_dollars=0.0123, move_dollars=0.0456, own_rate=0.15, best_rate=0.375)
    ledger.event("d1", decisions.RESUMED, instance_id=3, waited_seconds=42.4)
    waste = idle.record_idle_waste(ledger, "d1", 3, idle_seconds=600.0, dollars_per_hour=0.6, arm="lr_high")
    ledger.event("d1", early_stop.STOP_EVENT, arm="lr_high", rule="worse", step=800,
                 reason="stopped early: worse at step 800", why="p=0.001 at look 2 of 3")
    idle.record_idle_waste(ledger, "other", 9, idle_seconds=60.0, dollars_per_hour=1.0, arm=None)
    assert waste == pytest.approx(0.1)

    plain = cost_command(ledger, "d1", now=LATER, console_width=200)
    table = cost_command(ledger, "d1", now=LATER, console_width=200, detail=True)
    assert "Decisions" not in plain and "Decisions" in table
    expected = ["offer 77 failed; machine 901 excluded for the rest of the run: instance 5 not ready after 3s",
                "instance 3 (vast 4242) outbid: waited for it (expected $0.0123 waiting, $0.0456 moving;"
                " own $0.150/h, best offer $0.375/h)",
                "instance 3 resumed after its outbid, 42 s later",
                "instance 3 stopped: GPUs idle 600 s under arm lr_high, waste $0.1000",
                "arm lr_high stopped early at step 800: stopped early: worse at step 800 (p=0.001 at look 2 of 3)"]
    shown = [line for line in table.splitlines() if any(text in line for text in expected)]
    assert len(shown) == len(expected)                  # each once, in the order decided
    for line, text in zip(shown, expected):
        assert line.endswith(text)
    assert "instance 9" not in table                    # another run's decision

    markdown = cost_command(ledger, "d1", now=LATER, fmt="markdown", detail=True)
    assert sum(f"  {text}" in markdown and markdown.count(text) == 1 for text in expected) == len(expected)
    rows = [r for r in csv.DictReader(io.StringIO(cost_command(ledger, "d1", now=LATER, fmt="csv", detail=True)))
            if r["row"] == "decision"]
    assert [r["decision"] for r in rows] == expected
    assert [r["kind"] for r in rows] == [offers.EXCLUDED_EVENT, outbid.OUTBID_EVENT, decisions.RESUMED,
                                         idle.IDLE_EVENT, early_stop.STOP_EVENT]
    assert float(rows[3]["waste_dollars"]) == pytest.approx(0.1) and rows[3]["instance"] == "3"
    assert not [r for r in csv.DictReader(io.StringIO(cost_command(ledger, "d1", now=LATER, fmt="csv")))
                if r["row"] == "decision"]
    (study,) = json.loads(cost_command(ledger, "d1", now=LATER, fmt="json"))["studies"]
    assert [d["text"] for d in study["decisions"]] == expected
    assert study["decisions"][1]["detail"]["action"] == "wait"
