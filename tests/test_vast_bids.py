"""Interruptible instances (issue 13, point 1): the bid policy, and the simulator's bid market spoken through the
real vastai SDK (min_bid, outbids that stop an instance and keep its disk, resumes, change bid, rented offers)."""

from __future__ import annotations

import time

import pytest
import requests
import vastai

from orchestrator.backends.vast.config import VastConfig
from orchestrator.backends.vast.offers import after_outbid, bid_price
from tests.armature_helpers import vast_simulator

API_KEY = "bids-test-key"
OFFERS = [
    {"id": 1, "machine_id": 11, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.24, "min_bid": 0.12,
     "boot_delay_s": 0.2, "capacity": 1},
    {"id": 2, "machine_id": 12, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.30, "min_bid": 0.15,
     "boot_delay_s": 0.2},
]


# ---- the bid policy --------------------------------------------------------------------------

def test_bid_is_a_multiple_of_min_bid_capped_by_the_price_limit():
    offer = {"id": 1, "dph_total": 0.24, "min_bid": 0.12}
    assert bid_price(offer, VastConfig()) is None                                   # on-demand
    assert bid_price(offer, VastConfig(interruptible=True, bid_markup=1.5)) == pytest.approx(0.18)
    assert bid_price(offer, VastConfig(interruptible=True, bid_markup=3, max_dollars_per_hour=0.3)) == 0.3
    with pytest.raises(ValueError, match="bid_markup"):
        VastConfig(interruptible=True, bid_markup=0.5)                              # below the minimum bid


# ---- the market, through the SDK ---------------------------------------------------------------

@pytest.fixture
def sim(tmp_path):
    with vast_simulator(tmp_path / "vastsim", API_KEY, OFFERS) as simulator:
        yield simulator


def wait_status(vast, contract, status, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = vast.show_instance(contract)
        if row["actual_status"] == status:
            return row
        assert time.monotonic() < deadline, f"instance {contract} is {row['actual_status']}, never {status}"
        time.sleep(0.02)


def test_a_bid_below_min_bid_is_refused_and_bid_search_shows_min_bid(sim):
    vast = vastai.VastAI(api_key=API_KEY, server_url=sim.url)
    offers = vast.search_offers(query={"gpu_name": {"eq": "RTX 4090"}}, type="bid", no_default=True)
    assert {o["id"]: o["min_bid"] for o in offers} == {1: 0.12, 2: 0.15}
    with pytest.raises(requests.HTTPError) as err:
        vast.create_instance(1, image="x", price=0.10, cancel_unavail=True)
    assert err.value.response.status_code == 400 and "minimum bid" in err.value.response.json()["msg"]
    on_demand = vast.create_instance(2, image="x", cancel_unavail=True)["new_contract"]
    with pytest.raises(requests.HTTPError, match="400"):
        vast.change_bid(on_demand, price=0.5)                    # the rental type cannot change


def test_outbid_stops_keeps_the_disk_and_resumes(sim):
    vast = vastai.VastAI(api_key=API_KEY, server_url=sim.url)
    contract = vast.create_instance(1, image="x", price=0.15, cancel_unavail=True,
                                    onstart_cmd="echo started >> starts.txt; sleep 1000")["new_contract"]
    row = wait_status(vast, contract, "running")
    assert row["is_bid"] is True and row["dph_total"] == 0.15
    home = sim.instance_home(contract)
    (home / "checkpoint.pt").write_text("step 40")
    deadline = time.monotonic() + 5
    while not sim.instance_pids(contract):
        assert time.monotonic() < deadline, "onstart never started"
        time.sleep(0.02)

    sim.compete(1, bids=[0.20])                                  # a higher bid
    row = vast.show_instance(contract)
    assert (row["actual_status"], row["intended_status"]) == ("stopped", "running")
    assert "outbid" in row["status_msg"] and sim.instance_pids(contract) == []
    assert (home / "checkpoint.pt").read_text() == "step 40"    # the disk is kept
    # a bid search now needs more than the winning bid; an on-demand search still finds the machine
    bid_view = vast.search_offers(query={"id": {"eq": 1}}, type="bid", no_default=True)
    assert bid_view[0]["min_bid"] > 0.20
    assert [o["id"] for o in vast.search_offers(query={"id": {"eq": 1}})] == [1]

    vast.change_bid(contract, price=0.25)                        # outbid the other renter back
    wait_status(vast, contract, "running")
    deadline = time.monotonic() + 10                             # `running` comes first, then onstart runs
    while (home / "starts.txt").read_text().count("started") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (home / "starts.txt").read_text().count("started") == 2   # onstart ran again
    assert (home / "checkpoint.pt").read_text() == "step 40"

    sim.compete(1, on_demand=1)                                  # on-demand outranks every bid
    assert vast.show_instance(contract)["actual_status"] == "stopped"
    assert vast.search_offers(query={"id": {"eq": 1}}) == []     # rented: gone from the default search
    with pytest.raises(requests.HTTPError) as err:
        vast.create_instance(1, image="x", cancel_unavail=True)
    assert err.value.response.status_code == 410
    sim.compete(1)                                               # the other renter left: ours resumes
    wait_status(vast, contract, "running")

    charges = {line["metadata"]["instance_id"]: line for line in sim.state()["charges"]}
    assert charges[contract]["metadata"]["is_bid"] and charges[contract]["metadata"]["dph_total"] == 0.25


def test_our_own_on_demand_rental_outbids_our_bid(sim):
    vast = vastai.VastAI(api_key=API_KEY, server_url=sim.url)
    bid = vast.create_instance(1, image="x", price=0.13, cancel_unavail=True)["new_contract"]
    wait_status(vast, bid, "running")
    on_demand = vast.create_instance(1, image="x", cancel_unavail=True)["new_contract"]
    assert vast.show_instance(bid)["actual_status"] == "stopped"
    wait_status(vast, on_demand, "running")
    vast.destroy_instance(on_demand)                             # the machine is free: the bid runs again
    wait_status(vast, bid, "running")
    vast.stop_instance(bid)                                      # stopped by us: not waiting for the machine
    assert vast.show_instance(bid)["intended_status"] == "stopped"


def test_after_an_outbid_the_cheaper_expected_cost_wins():
    common = dict(own_rate=0.15, own_storage_per_hour=0.006, boot_hours=0.1, remaining_hours=2.0)
    # a long redo (an hour since the last pulled checkpoint) on a barely cheaper machine: wait 1 h for our own
    wait = after_outbid(best_rate=0.14, redo_hours=1.0, expected_wait_hours=1.0, **common)
    assert wait.action == "wait"
    assert wait.wait_dollars == pytest.approx(0.006 + 0.30) and wait.move_dollars == pytest.approx(0.14 * 3.1)
    # a fresh checkpoint and a much cheaper machine: move
    move = after_outbid(best_rate=0.08, redo_hours=0.05, expected_wait_hours=1.0, **common)
    assert move.action == "move" and move.move_dollars == pytest.approx(0.08 * 2.15)
    assert after_outbid(best_rate=0.5, redo_hours=1.0, expected_wait_hours=None, **common).action == "move"
