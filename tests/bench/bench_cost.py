"""Benchmark of issue 13 ("Cheaper studies"): one study's bill on demand against interruptible + early stop.

    .venv/bin/python tests/bench/bench_cost.py [--trace tests/bench/cost_trace.json] [--steps 1200] [--keep DIR]

A 12-arm, 3-seed VQ-VAE study (two planted arms with a learning rate near zero, clearly worse; nine small
variations of the baseline) runs twice through the real `armature ablation` against the Vast simulator (real
vastai SDK, real sshd, real trainers), each time in a fresh simulator replaying the same market trace
(cost_trace.json: the offers, a host whose creates fail, rival renters outbidding ours or renting on demand,
a preempted host, one going offline, at fixed seconds from the study's start):

1. on demand, every arm run to its last step;
2. `vast.interruptible: true` (bids at bid_markup x the offer's minimum bid, waiting for an outbid instance or
   moving) and `early_stop: {decided: true}`; failover over the ranked offers works in both.

Each study's bill is what the simulator's charges endpoint billed (fetched into the ledger at the end of the
run), split into GPU and storage, beside the ledger's estimate, reconciled per instance (1%). The verdicts are
each run's results.csv `verdict` column, an arm stopped early counted as its rule says ("worse at step N":
worse). The last line is `cost ratio: R (same verdicts: yes|no)`, R = interruptible dollars / on-demand dollars;
target R <= 0.5 with the same verdicts.
"""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from infra.vastsim import SimError, Simulator  # noqa: E402
from orchestrator.backends.vast import make_client  # noqa: E402
from orchestrator.backends.vast.offers import EXCLUDED_EVENT  # noqa: E402
from orchestrator.backends.vast.outbid import OUTBID_EVENT  # noqa: E402
from orchestrator.cost.reconcile import fetch_provider_charges, reconcile  # noqa: E402
from orchestrator.early_stop import STOP_EVENT  # noqa: E402
from tests.armature_helpers import ledger, start_armature, tiny_spec  # noqa: E402

TRACE = Path(__file__).with_name("cost_trace.json")
SEEDS = 3
PLANTED = {"crippled-lr": {"lr": 1.0e-9}, "frozen-lr": {"lr": 3.0e-9}}
VARIANTS = {"lr-1.5e-3": {"lr": 1.5e-3}, "lr-2.5e-3": {"lr": 2.5e-3}, "beta-0.2": {"vq.beta": 0.2},
            "beta-0.3": {"vq.beta": 0.3}, "ema-0.98": {"vq.ema_decay": 0.98}, "reset-25": {"vq.reset_every": 25},
            "reset-100": {"vq.reset_every": 100}, "batch-24": {"batch_size": 24}, "channels-24": {"model.channels": 24}}
# The simulator's times, scaled down from Vast's minutes to seconds (as the acceptance tests do). One instance per
# seed: the arms run one after the other (plan order), their seeds side by side, so an arm's seeds reach each
# interim look together.
VAST_SETTINGS = dict(min_cuda="null", disk_gb=10, max_dollars_per_hour=1.0, max_instances=SEEDS,
                     ready_deadline_seconds=30, status_poll_seconds=0.2, api_backoff_seconds=0.05,
                     api_deadline_seconds=60, create_timeout_seconds=30, create_lookup_seconds=5, poll_seconds=0.5,
                     pull_checkpoints_every_minutes=0.05, heartbeat_seconds=0.5, health_seconds=1.0,
                     heartbeat_timeout_seconds=30, orchestrator_silence_seconds=300, install_timeout_seconds=120,
                     destroy_deadline_seconds=60, stop_grace_seconds=10, idle_destroy_seconds=3,
                     idle_minutes="null", expected_hours_per_instance=0.05, max_launch_tries=6)
CHEAPER_VAST = dict(interruptible="true", bid_markup=1.1, outbid_wait_minutes=0.5)
CHEAPER_EARLY_STOP = "early_stop: {decided: true, looks: 2}\n"


def spec_text(sim: Simulator, steps: int, cheaper: bool) -> str:
    eval_every = steps // 6
    base = (f"{{steps: {steps}, eval_every: {eval_every}, checkpoint_every: {eval_every // 2}, "
            f"log_every: {eval_every // 2}, batch_size: 16, sample_every: 0, data.num_train: 256, "
            f"data.num_heldout: 64}}")
    arms = {"baseline": {}, **PLANTED, **VARIANTS}
    arm_lines = "".join(f"  - name: {name}\n    set: {json.dumps(values)}\n" for name, values in arms.items())
    vast = dict(VAST_SETTINGS, server_url=sim.url, **(CHEAPER_VAST if cheaper else {}))
    vast_lines = "".join(f"  {key}: {value}\n" for key, value in vast.items())
    return (f"name: cost-bench\ntrainer: vqvae\nmetric: {{name: recon_mse, mode: min}}\nbaseline: baseline\n"
            f"base: {base}\narms:\n{arm_lines}seeds: {SEEDS}\nresources: {{gpus: 1, cpus: 1}}\n"
            f"budget: {{max_dollars: 5}}\nbackend: vast\nvast:\n{vast_lines}"
            + (CHEAPER_EARLY_STOP if cheaper else ""))


class Market(threading.Thread):
    """Replays the trace's events on the simulator at their times from `started`; notes which touched us."""

    def __init__(self, sim: Simulator, events: list[dict], started: float):
        super().__init__(daemon=True)
        self.sim, self.events, self.started = sim, sorted(events, key=lambda e: e["at"]), started
        self.done = threading.Event()
        self.log: list[str] = []

    def ours_on(self, offer_id: int) -> list[int]:
        return [i["id"] for i in self.sim.instances(include_destroyed=True)
                if i["offer_id"] == offer_id and i["destroyed_at"] is None]

    def run(self) -> None:
        for event in self.events:
            if self.done.wait(max(0.0, self.started + event["at"] - time.time())):
                return
            offer, hit = event["offer"], self.ours_on(event["offer"])
            try:
                if "compete" in event:
                    self.sim.compete(offer, **event["compete"])
                    what = f"rivals on offer {offer}: {event['compete'] or 'none'}"
                else:
                    act = self.sim.preempt if event.get("preempt") else self.sim.go_offline
                    for instance in hit:
                        act(instance)
                    what = f"offer {offer} {'preempted' if event.get('preempt') else 'offline'}"
            except SimError as exc:           # the instance went away between the lookup and the event
                what = f"offer {offer}: {exc.msg}"
            self.log.append(f"t={event['at']:>3}s {what} (our instances there: {hit or 'none'})")


def run_study(root: Path, trace: dict, steps: int, cheaper: bool, key: str) -> dict:
    name = "interruptible+early-stop" if cheaper else "on-demand"
    run_id = "cheaper" if cheaper else "ondemand"
    home = root / run_id
    with Simulator(root / f"sim-{run_id}", api_key=key, offers=trace["offers"]) as sim:
        for offer_id, faults in trace.get("faults", {}).items():
            sim.set_faults(offer_id=int(offer_id), **faults)
        path = tiny_spec(root, spec_text(sim, steps, cheaper), name=f"{run_id}.yaml")
        log = root / f"{run_id}.log"
        started = time.time()
        proc = start_armature(home, "ablation", str(path), "--run-id", run_id, "--metrics-port", "-1",
                              "--allow-dirty", log=log, VAST_API_KEY=key)   # others may edit the tree meanwhile
        market = Market(sim, trace["events"], started)
        market.start()
        try:
            code = proc.wait(1800)
        finally:
            market.done.set()
            if proc.poll() is None:
                proc.kill()
        wall = time.time() - started
        if code != 0:
            print(f"{name}: armature exited {code}; end of {log}:\n{log.read_text()[-3000:]}", file=sys.stderr)
        db = ledger(home)
        fetch_provider_charges(make_client(sim.url, api_key=key), db, run_id)   # the final bill (adds nothing new)
        checks = reconcile(db, run_id)
        charges = sim.state()["charges"]
        left = sim.instances()
    rows = {row["arm"]: row for row in csv.DictReader(open(home / run_id / "results.csv"))}
    events = {kind: [json.loads(e["detail_json"]) for e in db.events(run_id, kind)]
              for kind in (OUTBID_EVENT, EXCLUDED_EVENT, STOP_EVENT)}
    return {
        "name": name, "exit_code": code, "wall_seconds": wall, "market": market.log, "left_alive": len(left),
        "billed": sum(c["amount"] for c in charges),
        "gpu": sum(c["metadata"]["gpu_amount"] for c in charges),
        "storage": sum(c["metadata"]["storage_amount"] for c in charges),
        "bandwidth": sum(c["metadata"]["bandwidth_amount"] for c in charges),
        "gpu_hours": sum(c["metadata"]["gpu_seconds"] for c in charges) / 3600,
        "instances": len(charges), "bids": sum(bool(c["metadata"]["is_bid"]) for c in charges),
        "ledger_billed": sum(c.billed_dollars or 0 for c in checks),
        "estimated": sum(c.estimated_dollars or 0 for c in checks),
        "worst_difference": max((abs(c.relative_difference) for c in checks if c.relative_difference is not None),
                                default=0.0),
        "worst_dollars": max((abs(c.difference) for c in checks if c.difference is not None), default=0.0),
        "flagged": [f"instance {c.provider_instance_id}: {c.reason}" for c in checks if c.flagged],
        "verdicts": {arm: verdict(row) for arm, row in rows.items()},
        "outbids": [f"{d.get('action')}" for d in events[OUTBID_EVENT]],
        "excluded": sorted({str(d.get("machine_id")) for d in events[EXCLUDED_EVENT]}),
        "stopped": {d["arm"]: d["step"] for d in events[STOP_EVENT]},
        "states": _states(db, run_id),
    }


def verdict(row: dict) -> str:
    """An arm's verdict as results.csv gives it; an arm stopped early by the `worse` rule counts as worse."""
    if row["verdict"]:
        return row["verdict"]
    if row["stopped_rule"] == "worse":
        return "worse"
    return f"stopped ({row['stopped_rule']})" if row["stopped_rule"] else "none"


def _states(db, run_id: str) -> dict[str, int]:
    states = [r["state"] for r in db.arm_runs(run_id)]
    return {s: states.count(s) for s in sorted(set(states))}


def show(study: dict) -> None:
    print(f"{study['name']}: exit {study['exit_code']}, wall {study['wall_seconds']:.0f} s, arm runs "
          f"{study['states']}, {study['instances']} instances ({study['bids']} bids), "
          f"{study['gpu_hours'] * 3600:.0f} GPU-s billed")
    for line in study["market"]:
        print(f"    {line}")
    print(f"    outbid decisions: {study['outbids'] or 'none'}; machines excluded: {study['excluded'] or 'none'}; "
          f"stopped early: {study['stopped'] or 'none'}; instances left alive: {study['left_alive']}")
    print(f"    bill (simulator charges): ${study['billed']:.5f} = GPU ${study['gpu']:.5f} + storage "
          f"${study['storage']:.5f} + bandwidth ${study['bandwidth']:.5f}")
    flagged = "; ".join(study["flagged"]) or "none flagged"
    print(f"    ledger: billed ${study['ledger_billed']:.5f}, estimated ${study['estimated']:.5f}; per instance "
          f"at worst {study['worst_difference']:.2%} or ${study['worst_dollars']:.5f} apart (flagged above 1%): {flagged}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=TRACE, help="offers, faults and market events (JSON)")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of every arm")
    parser.add_argument("--keep", type=Path, default=None, help="keep the homes, specs and logs in this folder")
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    args = parser.parse_args()
    trace = json.loads(args.trace.read_text())
    key = "bench-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        on_demand = run_study(root, trace, args.steps, cheaper=False, key=key)
        cheaper = run_study(root, trace, args.steps, cheaper=True, key=key)
    for study in (on_demand, cheaper):
        show(study)
    same = on_demand["verdicts"] == cheaper["verdicts"]
    print("verdicts (on demand | cheaper): " + ", ".join(
        f"{arm} {v}" + ("" if cheaper["verdicts"].get(arm) == v else f" | {cheaper['verdicts'].get(arm)}")
        for arm, v in on_demand["verdicts"].items()))
    if args.json:
        print(json.dumps({"on_demand": on_demand, "cheaper": cheaper}, indent=2, default=str))
    ratio = cheaper["billed"] / on_demand["billed"] if on_demand["billed"] else float("nan")
    print(f"cost ratio: {ratio:.2f} (same verdicts: {'yes' if same else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
