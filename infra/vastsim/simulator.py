"""The simulated Vast account: offers, instances, keys, charges, faults.

All state lives in memory behind one lock and is mirrored to
``<state_dir>/vastsim-state.json`` after every change. A clock thread steps
every instance's lifecycle (lifecycle.py) with the faults that apply now.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

from . import billing, offers as offer_search
from .faults import Faults
from .instances import SYSTEM_PATH, InstanceHost, find_sshd, free_port, kill_marked_processes
from .lifecycle import OFFLINE_MSG, PREEMPTED_MSG, Instance

DEFAULT_API_KEY = "vastsim-dev-key"
STATE_FILE = "vastsim-state.json"
LOG_FILE = "vastsim.log"


class SimError(Exception):
    """An API error: HTTP status plus Vast's ``{"success": false, "error", "msg"}`` body."""

    def __init__(self, status: int, error: str, msg: str, headers: dict | None = None):
        super().__init__(msg)
        self.status, self.error, self.msg, self.headers = status, error, msg, headers or {}


class Simulator:
    """A local Vast.ai: ``Simulator(state_dir).start()``, point the SDK at ``.url``, ``.stop()``.

    Scenario controls: ``set_faults(offer_id=None, **faults)`` / ``clear_faults()``,
    ``preempt(id)``, ``go_offline(id)``, ``change_host_key(id)``, ``set_gpu(id, gpu=None, **values)``,
    ``add_offer(config)`` / ``remove_offer(offer_id)``, ``compete(offer_id, on_demand=0, bids=())`` (other renters
    in the bid market of an offer with a ``capacity``), ``add_traffic(id, up_bytes, down_bytes)``.
    Inspection: ``instances()``,
    ``instance_pids(id)``, ``instance_home(id)``, ``sftp_reading(id)``, ``state()``. ``stop()`` destroys every
    instance and kills all of their processes.
    """

    def __init__(self, state_dir, api_key: str = DEFAULT_API_KEY, offers: list[dict] | None = None,
                 python: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 initial_credit: float = 100.0, tick_s: float = 0.05, extra_api_keys: tuple[str, ...] = ()):
        self.state_dir = Path(state_dir).resolve()
        self._api_keys = (api_key, *extra_api_keys)      # several keys of one account (a team's members)
        self.python = python or sys.executable
        configs = offer_search.DEFAULT_OFFERS if offers is None else offers
        self.offers = {o["id"]: o for o in map(offer_search.normalize_offer, configs)}
        self.faults = Faults()
        self.initial_credit = float(initial_credit)
        self.token = secrets.token_hex(8)
        self.started_at = time.time()
        self._bind = (host, port)
        self._tick_s = tick_s
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._instances: dict[int, Instance] = {}
        self._next_id = random.randint(20_000_000, 29_000_000)
        self._account_keys: list[dict] = []
        self._results: dict[str, str] = {}
        self._demand: dict[int, dict] = {}   # offer id -> other renters: {"on_demand": N, "bids": [$/h, ...]}
        self._server = None
        self._threads: list[threading.Thread] = []
        self.log = logging.getLogger(f"vastsim.{self.token[:6]}")
        self._log_handler: logging.Handler | None = None

    # ---- running the simulator ---------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("simulator not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Simulator":
        from .server import make_server  # server imports this module

        if find_sshd() is None:
            raise RuntimeError("sshd not found: apt-get install -y --no-install-recommends openssh-server")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "instances").mkdir(exist_ok=True)
        self._log_handler = logging.FileHandler(self.state_dir / LOG_FILE)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(self._log_handler)
        self.log.setLevel(logging.INFO)
        self._reap_previous_run()
        self._server = make_server(self, *self._bind)
        self._threads = [threading.Thread(target=self._server.serve_forever, name="vastsim-http", daemon=True),
                         threading.Thread(target=self._run_clock, name="vastsim-clock", daemon=True)]
        for thread in self._threads:
            thread.start()
        self.log.info("vastsim listening on %s, state in %s", self.url, self.state_dir)
        self._save()
        return self

    def stop(self) -> None:
        """Destroy every instance (killing all their processes) and stop serving."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            for inst in list(self._instances.values()):
                if inst.live:
                    inst.destroy("simulator stopped")
            self._save()
        self.log.info("vastsim stopped")
        if self._log_handler is not None:
            self.log.removeHandler(self._log_handler)
            self._log_handler.close()

    def __enter__(self) -> "Simulator":
        return self if self._server is not None else self.start()    # `with Simulator(...).start() as sim` too

    def __exit__(self, *exc) -> None:
        self.stop()

    def _reap_previous_run(self) -> None:
        """Kill processes and remove disks left by an earlier simulator on this state dir that died."""
        path = self.state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
            previous = state["simulator"]
        except (OSError, ValueError, KeyError):
            return
        if previous.get("running") and previous.get("pid") != os.getpid() and _pid_alive(previous.get("pid")):
            raise RuntimeError(f"{self.state_dir} is in use by a running simulator (pid {previous['pid']})")
        killed = kill_marked_processes({"VASTSIM_SIM": previous.get("token", "")}) if previous.get("token") else 0
        if killed:
            self.log.warning("killed %d processes left by a previous simulator", killed)
        for record in state.get("instances", []):
            if record.get("destroyed_at") is None and Path(record["home"]).parent == self.state_dir / "instances":
                shutil.rmtree(record["home"], ignore_errors=True)

    def _run_clock(self) -> None:
        while not self._stopping.wait(self._tick_s):
            with self._lock:
                changed = False
                for inst in [i for i in self._instances.values() if i.live]:
                    try:
                        changed = inst.advance(self.faults.for_offer(inst.offer["id"])) or changed
                    except Exception:  # keep the clock going for the other instances
                        self.log.exception("instance %s: lifecycle step failed", inst.id)
                if changed:
                    for offer_id in [o["id"] for o in self.offers.values() if o["capacity"] is not None]:
                        self._settle_market(offer_id)     # a fault preempted a holder: a waiting bid may resume
                    self._save()

    # ---- helpers for the API -----------------------------------------------

    def _instance(self, instance_id) -> Instance:
        inst = self._instances.get(int(instance_id))
        if inst is None or not inst.live:
            raise SimError(404, "no_such_instance", f"Instance {instance_id} not found.")
        return inst

    def _save(self) -> None:
        state = {
            "simulator": {"url": self.url if self._server else None, "pid": os.getpid(), "token": self.token,
                          "running": not self._stopping.is_set(), "started_at": self.started_at,
                          "state_dir": str(self.state_dir), "python": self.python},
            "faults": self.faults.as_dict(),
            "offers": [offer_search.public_offer(o) | {"boot_delay_s": o["boot_delay_s"], "capacity": o["capacity"],
                                                       "demand": self._demand.get(o["id"])}
                       for o in self.offers.values()],
            "account_ssh_keys": self._account_keys,
            "instances": [inst.record() for inst in self._instances.values()],
            "charges": self._charge_lines(),
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, default=str))
        os.replace(tmp, self.state_dir / STATE_FILE)

    def _charge_lines(self) -> list[dict]:
        now = time.time()
        return [billing.charge_line(inst.record(), now) for inst in self._instances.values()]

    # ---- authentication ----------------------------------------------------

    def principal(self, key: str | None):
        """"account" for the account key, ("instance", id) for an instance-scoped key, else None."""
        if key and any(secrets.compare_digest(key, account_key) for account_key in self._api_keys):
            return "account"
        with self._lock:
            for inst in self._instances.values():
                if key and inst.live and secrets.compare_digest(key, inst.scoped_key):
                    return ("instance", inst.id)
        return None

    # ---- API operations (called by server.py with the lock not held) ---------

    def take_rate_limit(self) -> tuple[bool, float | None]:
        """Whether this API request gets a 429, and the Retry-After to send with it."""
        with self._lock:
            return self.faults.take_rate_limit(), self.faults.requests.rate_limit_retry_after

    def api_down(self) -> bool:
        """Whether the API answers nothing right now (fault api_down_s)."""
        with self._lock:
            return self.faults.api_down()

    def search_offers(self, query: dict) -> list[dict]:
        with self._lock:
            try:
                return offer_search.search(self._market_view(bids=query.get("type") == "bid"), query)
            except offer_search.QueryError as err:
                raise SimError(400, "invalid_args", str(err)) from err

    def create_instance(self, offer_id: int, body: dict) -> int:
        requested_at = time.time()  # billing and boot count from the request, like Vast's contract
        with self._lock:
            if self._stopping.is_set():
                raise SimError(503, "unavailable", "The simulator is shutting down.")
            offer = self.offers.get(int(offer_id))
            gone = offer is None or not offer["rentable"] or self.faults.take_create_failure(int(offer_id))
            if not gone and body.get("price") is None:
                gone = self._full_of_on_demand(offer)
            if gone:
                status = 410 if body.get("cancel_unavail") else 404
                raise SimError(status, "no_such_ask", f"Offer {offer_id} is no longer available.")
            bid = self._check_bid(offer, body.get("price"))
            instance_id = self._next_id
            self._next_id += 1
            inst = Instance(
                id=instance_id, offer=offer, label=body.get("label"), image=body.get("image"),
                env=_container_env(body.get("env")), onstart=body.get("onstart") or body.get("onstart_cmd"),
                disk_gb=float(body.get("disk") or 10), scoped_key=secrets.token_hex(32),
                host=InstanceHost(self.state_dir / "instances" / str(instance_id),
                                  {"VASTSIM_SIM": self.token, "VASTSIM_INSTANCE": str(instance_id)},
                                  free_port(), self.python),
                log=self.log, created_at=requested_at, bid=bid)
            inst.host.prepare(self._session_env(inst), [k["key"] for k in self._account_keys],
                              offer["gpu_name"], offer["num_gpus"], offer["gpu_ram"], offer["driver_version"])
            self._instances[instance_id] = inst
            inst.host.log(f"created from offer {offer['id']} ({offer['num_gpus']}x {offer['gpu_name']})")
            inst.boot(at=requested_at)
            self.log.info("instance %s created from offer %s, label %r%s", instance_id, offer["id"], inst.label,
                          f", bid ${bid}/h" if bid is not None else "")
            self._settle_market(offer["id"])
            offer_faults = self.faults.for_offer(offer["id"])
            if offer_faults.gone_once_rented:
                offer["rentable"] = False
            self._save()
            answer_fault = self.faults.take_create_answer_fault()
            stall_s = self.faults.requests.create_stall_s
            if answer_fault is None and offer_faults.create_answer_after_s > 0:
                answer_fault, stall_s = "stall", offer_faults.create_answer_after_s
        if answer_fault == "stall":
            self.log.info("instance %s: create answer stalls %.1fs (fault)", instance_id, stall_s)
            time.sleep(stall_s)
        elif answer_fault == "502":
            self.log.info("instance %s: create answers 502 (fault)", instance_id)
            raise SimError(502, "bad_gateway", "Bad gateway.")
        return instance_id

    def _session_env(self, inst: Instance) -> dict[str, str]:
        port = str(inst.host.port)
        return dict(inst.env, **{
            "HOME": str(inst.host.home),
            "PATH": f"{inst.host.home / 'bin'}:{SYSTEM_PATH}",
            "CONTAINER_ID": str(inst.id),
            "CONTAINER_API_KEY": inst.scoped_key,
            "VAST_CONTAINERLABEL": f"C.{inst.id}",
            "VAST_SERVER_URL": self.url,
            "VAST_URL": self.url,
            "PUBLIC_IPADDR": "127.0.0.1",
            "VAST_TCP_PORT_22": port,
            "VASTSIM_SIM": self.token,
            "VASTSIM_INSTANCE": str(inst.id),
        })

    def list_instances(self, select_filters: dict | None = None, order_by=None) -> list[dict]:
        with self._lock:
            shown_before = time.time() - self.faults.requests.list_lag_s
            rows = [inst.row() for inst in self._instances.values() if inst.live and inst.created_at <= shown_before]
        try:
            rows = [r for r in rows if offer_search.row_matches(r, select_filters or {})]
        except offer_search.QueryError as err:
            raise SimError(400, "invalid_args", str(err)) from err
        order = [[o["col"], o.get("dir", "asc")] if isinstance(o, dict) else o for o in (order_by or [])]
        return offer_search.sort_rows(rows, order or [["id", "asc"]])

    def show_instance(self, instance_id: int) -> dict | None:
        with self._lock:
            inst = self._instances.get(int(instance_id))
            return inst.row() if inst is not None and inst.live else None

    def update_instance(self, instance_id: int, body: dict) -> None:
        """PUT /instances/{id}/: ``label`` and/or ``state`` ("stopped" / "running")."""
        with self._lock:
            inst = self._instance(instance_id)
            if "label" in body:
                inst.label = body["label"]
            state = body.get("state")
            if state == "stopped" and inst.outbid:
                inst.intended, inst.outbid = "stopped", False       # no longer waiting to win the machine back
            elif state == "stopped" and inst.status not in ("stopped", "exited", "offline"):
                inst.interrupt("stopped", "stopped by user")
            elif state == "running" and inst.status in ("stopped", "exited"):
                inst.boot()
            elif state == "running" and inst.status == "offline":
                raise SimError(400, "instance_offline", f"Instance {inst.id} is on an offline host.")
            elif state not in (None, "stopped", "running"):
                raise SimError(400, "invalid_args", f"unknown state {state!r}")
            self._settle_market(inst.offer["id"])
            self._save()

    def change_bid(self, instance_id: int, price) -> None:
        """PUT /instances/bid_price/{id}/: a new bid for an interruptible instance (it may win or lose its machine)."""
        with self._lock:
            inst = self._instance(instance_id)
            if inst.bid is None:
                raise SimError(400, "invalid_args",
                               f"Instance {inst.id} is on-demand; the rental type cannot change after creation.")
            if price is None:
                raise SimError(400, "invalid_args", "price: a bid in $/h is required")
            inst.bid = self._check_bid(inst.offer, price)
            inst.host.log(f"bid changed to ${inst.bid}/h")
            self._settle_market(inst.offer["id"])
            self._save()

    # ---- the bid market --------------------------------------------------------

    def _check_bid(self, offer: dict, price) -> float | None:
        """A create's or change's bid as $/h (None: on-demand); below the offer's minimum bid is refused."""
        if price is None:
            return None
        try:
            bid = float(price)
        except (TypeError, ValueError):
            raise SimError(400, "invalid_args", f"price: {price!r} is not a number ($/h)") from None
        if bid < offer["min_bid"]:
            raise SimError(400, "invalid_args",
                           f"price: a bid of ${bid:g}/h is below offer {offer['id']}'s minimum bid "
                           f"${offer['min_bid']:g}/h")
        return bid

    def _holders(self, offer_id: int) -> list[tuple]:
        """Everyone who wants the offer's machines, in the order they get them: on-demand rentals (ours, then
        other renters') first, then bids by price, highest first (ours before others' on a tie, older first).
        Each entry is (bid or None, our Instance or None)."""
        ours = [i for i in self._instances.values()
                if i.live and i.offer["id"] == offer_id and i.intended == "running" and i.status != "offline"]
        demand = self._demand.get(offer_id) or {}
        on_demand = [(None, i) for i in sorted(ours, key=lambda i: i.created_at) if i.bid is None]
        on_demand += [(None, None)] * int(demand.get("on_demand", 0))
        bids = [(i.bid, 0, i.created_at, i) for i in ours if i.bid is not None]
        bids += [(float(price), 1, 0.0, None) for price in demand.get("bids", [])]
        bids.sort(key=lambda entry: (-entry[0], entry[1], entry[2]))
        return on_demand + [(price, inst) for price, _, _, inst in bids]

    def _settle_market(self, offer_id: int) -> None:
        """Give the offer's machines to the first `capacity` holders: a bid instance of ours left out is outbid
        (stopped, processes killed, disk kept, intended still running); an outbid one let back in boots again."""
        offer = self.offers.get(offer_id)
        if offer is None:
            return
        capacity = offer.get("capacity")
        holders = self._holders(offer_id)
        for place, (_, inst) in enumerate(holders):
            if inst is None:
                continue
            fits = capacity is None or place < capacity
            if not fits and not inst.outbid:
                inst.lose_bid()
            elif fits and inst.outbid:
                inst.host.log("won the machine back")
                inst.boot()

    def _full_of_on_demand(self, offer: dict) -> bool:
        capacity = offer.get("capacity")
        return capacity is not None and sum(bid is None for bid, _ in self._holders(offer["id"])) >= capacity

    def _market_view(self, bids: bool) -> list[dict]:
        """Offers as a search sees them: one full of on-demand rentals is `rented` (the SDK's default query leaves
        it out); in a bid search, a full offer's `min_bid` is what it takes to outbid its lowest winning bid."""
        view = []
        for offer in self.offers.values():
            offer = dict(offer, rented=offer["rented"] or self._full_of_on_demand(offer))
            capacity = offer["capacity"]
            holders = self._holders(offer["id"])
            if bids and capacity is not None and len(holders) >= capacity:
                lowest_winner = holders[capacity - 1][0]
                if lowest_winner is not None:
                    offer["min_bid"] = max(offer["min_bid"], round(lowest_winner + 0.001, 4))
            view.append(offer)
        return view

    def compete(self, offer_id: int, on_demand: int = 0, bids=()) -> None:
        """Other renters of an offer (replacing earlier ones): `on_demand` rentals and `bids` ($/h). With the
        offer's `capacity` set, they may outbid our interruptible instances; clearing them lets ours resume."""
        with self._lock:
            if int(offer_id) not in self.offers:
                raise SimError(404, "no_such_ask", f"Offer {offer_id} not found.")
            self._demand[int(offer_id)] = {"on_demand": int(on_demand), "bids": [float(b) for b in bids]}
            self.log.info("offer %s: other renters %s", offer_id, self._demand[int(offer_id)])
            self._settle_market(int(offer_id))
            self._save()

    def add_traffic(self, instance_id: int, up_bytes: float = 0.0, down_bytes: float = 0.0) -> None:
        """Count bandwidth against an instance (billed at its offer's inet_up_cost / inet_down_cost $/GB)."""
        with self._lock:
            inst = self._instance(instance_id)
            inst.bytes_up += float(up_bytes)
            inst.bytes_down += float(down_bytes)
            self._save()

    def reboot_instance(self, instance_id: int) -> None:
        with self._lock:
            inst = self._instance(instance_id)
            if inst.status == "offline":
                raise SimError(400, "instance_offline", f"Instance {inst.id} is on an offline host.")
            inst.interrupt("stopped", "rebooting")
            inst.boot()
            self._settle_market(inst.offer["id"])
            self._save()

    def destroy_instance(self, instance_id: int) -> None:
        with self._lock:
            inst = self._instance(instance_id)
            if self.faults.take_destroy_failure() or self.faults.for_offer(inst.offer["id"]).destroy_fails:
                self.log.info("instance %s: destroy failed (fault)", inst.id)
                raise SimError(500, "server_error", "Internal error while destroying the instance; try again.")
            inst.destroy("destroyed via API")
            if self.faults.for_offer(inst.offer["id"]).gone_once_rented:
                inst.offer["rentable"] = True          # the machine is free again
            self._settle_market(inst.offer["id"])
            self._save()

    def attach_ssh_key(self, instance_id: int, key: str) -> bool:
        _check_public_key(key)
        with self._lock:
            inst = self._instance(instance_id)
            added = inst.host.add_authorized_key(key)
            inst.host.log("ssh key attached")
            return added

    def account_ssh_keys(self) -> list[dict]:
        with self._lock:
            return [dict(k) for k in self._account_keys]

    def add_account_ssh_key(self, key: str) -> dict:
        _check_public_key(key)
        with self._lock:
            entry = {"id": len(self._account_keys) + 1, "user_id": 1, "key": key.strip(),
                     "created_at": time.time(), "deleted_at": None}
            self._account_keys.append(entry)
            self._save()
            return dict(entry)

    def delete_account_ssh_key(self, key_id: int) -> None:
        with self._lock:
            before = len(self._account_keys)
            self._account_keys = [k for k in self._account_keys if k["id"] != int(key_id)]
            if len(self._account_keys) == before:
                raise SimError(404, "no_such_key", f"SSH key {key_id} not found.")
            self._save()

    def request_logs(self, instance_id: int, tail=None) -> str:
        """Snapshot the container log; returns the token of the result served at /_sim/results/."""
        with self._lock:
            inst = self._instance(instance_id)
            lines = inst.host.read_log().splitlines(keepends=True)
        if tail:
            lines = lines[-int(tail):]
        token = secrets.token_hex(12)
        self._results[token] = "".join(lines)
        return token

    def result(self, token: str) -> str | None:
        return self._results.get(token)

    def user(self) -> dict:
        with self._lock:
            spent = sum(line["amount"] for line in self._charge_lines())
            return {
                "id": 1, "username": "vastsim", "email": "you@vastsim.local", "fullname": "Vast Simulator",
                "credit": self.initial_credit - spent, "balance": 0.0,
                "total_spend": spent, "balance_threshold": 0.0,
                "balance_threshold_enabled": False, "has_billing": True, "can_pay": True,
                "ssh_key": self._account_keys[0]["key"] if self._account_keys else "",
            }

    def charges(self, select_filters, latest_first, limit, after_token) -> dict:
        with self._lock:
            lines = self._charge_lines()
        return billing.charges_page(lines, select_filters, latest_first, limit, after_token)

    def legacy_invoices(self, sdate: float, edate: float) -> dict:
        with self._lock:
            lines = self._charge_lines()
        return billing.legacy_invoices(lines, sdate, edate, self.initial_credit, self.started_at)

    # ---- scenario controls (tests, /_sim/ endpoints) -----------------------

    def set_faults(self, offer_id: int | None = None, **faults) -> dict:
        """Set faults by name (see faults.py); ``offer_id`` scopes instance faults to one offer."""
        with self._lock:
            self.faults.set(offer_id, **faults)
            self.log.info("faults set%s: %s", f" for offer {offer_id}" if offer_id is not None else "", faults)
            self._save()
            return self.faults.as_dict()

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            self._save()

    def instances(self, include_destroyed: bool = False) -> list[dict]:
        """API rows of live instances; with ``include_destroyed`` the records of all instances."""
        with self._lock:
            if include_destroyed:
                return [inst.record() for inst in self._instances.values()]
            return [inst.row() for inst in self._instances.values() if inst.live]

    def instance_pids(self, instance_id: int) -> list[int]:
        """Pids of every live process of the instance (sshd, sessions, detached jobs)."""
        with self._lock:
            inst = self._instances[int(instance_id)]
        return inst.host.pids()

    def sftp_reading(self, instance_id: int) -> bool:
        """Whether a slowed SFTP read (fault slow_sftp_read_s) of the instance is under way: a pull in progress."""
        with self._lock:
            inst = self._instances[int(instance_id)]
        return inst.host.sftp_busy_marker.exists()

    def instance_home(self, instance_id: int) -> Path:
        with self._lock:
            return self._instances[int(instance_id)].host.home

    def preempt(self, instance_id: int) -> None:
        """The host takes the GPUs back: `exited`, all processes and sshd killed."""
        with self._lock:
            inst = self._instance(instance_id)
            inst.interrupt("exited", PREEMPTED_MSG)
            self._settle_market(inst.offer["id"])
            self._save()

    def go_offline(self, instance_id: int) -> None:
        """The host stops answering: `offline`, all processes and sshd killed."""
        with self._lock:
            self._instance(instance_id).interrupt("offline", OFFLINE_MSG)
            self._save()

    def change_host_key(self, instance_id: int) -> None:
        """A new ed25519 host key; sshd restarts on the same port (clients that pinned the old key must fail)."""
        with self._lock:
            self._instance(instance_id).change_host_key()

    def set_gpu(self, instance_id: int, gpu: int | None = None, **values) -> list[dict]:
        """Live nvidia-smi values, e.g. ``set_gpu(id, temperature=92, throttle_reasons=0x40)``."""
        with self._lock:
            inst = self._instance(instance_id)
            try:
                gpus = inst.host.set_gpu_values(gpu, **values)
            except ValueError as err:
                raise SimError(400, "invalid_args", str(err)) from err
            inst.host.log(f"gpu scenario {values}")
            return gpus

    def add_offer(self, config: dict) -> dict:
        with self._lock:
            offer = offer_search.normalize_offer(config)
            self.offers[offer["id"]] = offer
            self._save()
            return offer_search.public_offer(offer)

    def remove_offer(self, offer_id: int) -> None:
        """The offer disappears from search and creates on it fail with no_such_ask."""
        with self._lock:
            if self.offers.pop(int(offer_id), None) is None:
                raise SimError(404, "no_such_ask", f"Offer {offer_id} not found.")
            self._save()

    def state(self) -> dict:
        with self._lock:
            self._save()
            return json.loads((self.state_dir / STATE_FILE).read_text())


def _container_env(env) -> dict[str, str]:
    """Environment variables from a create body's ``env`` (docker options like "-p 80:80" are dropped)."""
    if not isinstance(env, dict):
        return {}
    result = {}
    for name, value in env.items():
        if not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            continue
        value = "" if value is None else str(value)
        if "\n" in value or "\r" in value:
            raise SimError(400, "invalid_args", f"env {name}: values cannot contain newlines")
        result[name] = value
    return result


def _check_public_key(key) -> None:
    if not isinstance(key, str) or len(key.split()) < 2 or not key.split()[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise SimError(400, "invalid_args", "ssh_key must be an OpenSSH public key line (ssh-ed25519 AAAA...)")


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
