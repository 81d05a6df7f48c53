"""Offer failover (issue 13, point 3) and idle paid GPUs (point 5), against the simulator through the vastai SDK."""

from __future__ import annotations

import json
import time

import pytest
import requests
import vastai

from orchestrator.backends.vast import provider
from orchestrator.backends.vast.config import VastConfig
from orchestrator.backends.vast.idle import IdleWatch, record_idle_waste
from orchestrator.backends.vast.offers import EXCLUDED_EVENT, RankedOffers, format_plan, plan_rows, rank
from tests.armature_helpers import run_ledger, vast_simulator

API_KEY = "failover-test-key"
OFFERS = [   # ranked 1, 2, 3 by price per reliable hour
    {"id": 1, "machine_id": 11, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.20, "min_bid": 0.10,
     "boot_delay_s": 0.2},
    {"id": 2, "machine_id": 12, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.25, "min_bid": 0.10,
     "boot_delay_s": 0.2},
    {"id": 3, "machine_id": 13, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.30, "min_bid": 0.11,
     "boot_delay_s": 0.2},
]
CFG = VastConfig(gpu_name="RTX 4090", max_dollars_per_hour=1.0, min_reliability=0.5, min_cuda=None,
                 min_download_mbps=None, disk_gb=10, api_deadline_seconds=5, api_backoff_seconds=0.05)


@pytest.fixture
def sim(tmp_path):
    with vast_simulator(tmp_path / "vastsim", API_KEY, OFFERS) as simulator:
        yield simulator


@pytest.fixture
def ledger(tmp_path):
    opened = run_ledger(tmp_path / "ledger.sqlite", "fo")
    yield opened
    opened.close()


def reaches_running(vast, contract, deadline_s) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if (vast.show_instance(contract) or {}).get("actual_status") == "running":
            return True
        time.sleep(0.02)
    return False


def test_a_failed_create_and_a_stuck_boot_move_on_to_the_next_offer_of_the_same_list(sim, ledger):
    vast = vastai.VastAI(api_key=API_KEY, server_url=sim.url)
    sim.set_faults(offer_id=1, no_such_ask=True)           # the best offer: create refused
    sim.set_faults(offer_id=2, stuck_loading=True)         # the next: never leaves loading
    excluded: set[str] = set()
    ranked = RankedOffers(rank(provider.search_offers(vast, CFG), excluded, cfg=CFG), excluded)
    assert [o["id"] for o in ranked.offers] == [1, 2, 3]
    assert format_plan(plan_rows(ranked.offers, CFG))[0].startswith("   1. offer 1 (machine 11) 1x RTX 4090: $0.200/h")

    rented = None
    while rented is None and (offer := ranked.next()) is not None:
        try:
            contract = vast.create_instance(offer["id"], image="x", disk=10, cancel_unavail=True)["new_contract"]
        except requests.HTTPError as exc:
            ranked.failed(offer, f"create refused: {exc}", ledger, "fo")
            continue
        if reaches_running(vast, contract, deadline_s=1.5):
            rented = offer
        else:
            vast.destroy_instance(contract)
            ranked.failed(offer, "stuck in loading past the ready deadline", ledger, "fo")
    assert rented["id"] == 3
    assert excluded == {"11", "12"}                        # out for the rest of the run
    events = [json.loads(e["detail_json"]) for e in ledger.events("fo", EXCLUDED_EVENT)]
    assert [(e["machine_id"], e["reason"].split(":")[0]) for e in events] == [
        ("11", "create refused"), ("12", "stuck in loading past the ready deadline")]
    assert [o["id"] for o in rank(provider.search_offers(vast, CFG), excluded, cfg=CFG)] == [3]


def test_interruptible_ranking_and_plan_use_the_bid():
    cfg = CFG.model_copy(update={"interruptible": True, "bid_markup": 2.0})
    ranked = rank([{**o, "reliability2": 0.99} for o in OFFERS], set(), cfg=cfg)
    # bids 0.20, 0.20, 0.22: the first two tie on price, so on reliability, then list order
    rows = plan_rows(ranked, cfg)
    assert [(r["offer_id"], r["dollars_per_hour"], r["kind"]) for r in rows] == [
        (1, 0.2, "bid"), (2, 0.2, "bid"), (3, 0.22, "bid")]


def test_idle_gpus_are_stopped_and_reported_as_waste(sim, ledger):
    vast = vastai.VastAI(api_key=API_KEY, server_url=sim.url)
    idle, busy, deploying = (vast.create_instance(n, image="x", disk=10, cancel_unavail=True)["new_contract"]
                             for n in (1, 2, 3))
    for contract in (idle, busy, deploying):
        assert reaches_running(vast, contract, 5)
    sim.set_gpu(busy, utilization=93)
    watch = IdleWatch(idle_minutes=0.01, idle_gpu_percent=5.0)          # 0.6 s
    arm_state = {idle: "running", busy: "running", deploying: "deploying"}
    stopped = {}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and idle not in stopped:
        for contract in (idle, busy, deploying):
            row = vast.show_instance(contract)
            over = watch.observe(contract, [row["gpu_util"]], arm_state[contract], time.time())
            if over is not None:
                vast.stop_instance(contract)
                stopped[contract] = record_idle_waste(ledger, "fo", contract, over, row["dph_total"], "a")
        time.sleep(0.05)
    assert list(stopped) == [idle]                         # busy GPUs and a deploying arm are not waste
    assert stopped[idle] == pytest.approx(0.20 * 0.6 / 3600, rel=0.2)
    assert vast.show_instance(idle)["actual_status"] == "stopped"
    event = json.loads(ledger.events("fo", "instance.idle_stopped")[0]["detail_json"])
    assert event["instance_id"] == idle and event["waste_dollars"] == stopped[idle]
