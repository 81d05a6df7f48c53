"""Which Vast offers to rent: the search query from a VastConfig, and the ranking of the answers.

The query is Vast's JSON search language (vast-api.md): `field: {op: value}`
with numbers as strings, as the SDK's own query parser sends them. Offers are
ranked by price per reliable hour (the $/h the rental is billed, its bid when
interruptible, over reliability), so a slightly dearer machine that rarely fails
beats a cheap one that often does; machines that already failed in this run are
left out. `RankedOffers` walks one search's ranking: a create that fails, an
instance stuck loading or SSH that never answers moves on to the next offer of
the same list, and the machine is excluded for the rest of the run (an
`offer.excluded` ledger event). `after_outbid` weighs waiting for an outbid
interruptible instance against moving to the best offer now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from orchestrator.backends.vast.config import VastConfig
from orchestrator.cost import decisions

EXCLUDED_EVENT = decisions.EXCLUDED


def _number(value: float) -> str:
    return f"{value:g}"


def build_query(cfg: VastConfig) -> dict:
    """The filters of a search for instances like `cfg` asks for (order, type, limit are added by the SDK)."""
    query: dict = {
        "verified": {"eq": True} if cfg.verified else None,
        "external": {"eq": False},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "num_gpus": {"eq": str(cfg.num_gpus)},
        "reliability": {"gte": _number(cfg.min_reliability)},
        "dph_total": {"lte": _number(cfg.max_dollars_per_hour)},
        "disk_space": {"gte": _number(cfg.disk_gb)},
    }
    if cfg.gpu_name:
        query["gpu_name"] = {"eq": cfg.gpu_name.replace("_", " ")}
    if cfg.min_gpu_memory_gb is not None:
        query["gpu_ram"] = {"gte": _number(cfg.min_gpu_memory_gb * 1000)}   # the API counts MB
    if cfg.min_cuda is not None:
        query["cuda_max_good"] = {"gte": _number(cfg.min_cuda)}
    if cfg.min_download_mbps:
        query["inet_down"] = {"gte": _number(cfg.min_download_mbps)}
    return {k: v for k, v in query.items() if v is not None}


def reliability_of(offer: dict) -> float:
    value = offer.get("reliability2", offer.get("reliability"))
    try:
        return min(1.0, max(0.01, float(value)))
    except (TypeError, ValueError):
        return 0.01


def rank(offers: Iterable[dict], exclude_machines: set[str], exclude_offers: set[str] = frozenset(),
         cfg: VastConfig | None = None) -> list[dict]:
    """Offers best first (lowest $/h / reliability), without excluded machines and offers. The $/h is what
    the rental is billed (contract_rate) when `cfg` is given, else the offer's dph_total."""
    usable = [o for o in offers
              if str(o.get("machine_id")) not in exclude_machines and str(o.get("id")) not in exclude_offers
              and o.get("dph_total") is not None]

    def price(offer: dict) -> float:
        return contract_rate(offer, cfg) if cfg is not None else float(offer["dph_total"])

    return sorted(usable, key=lambda o: (price(o) / reliability_of(o), -reliability_of(o)))


def contract_rate(offer: dict, cfg: VastConfig) -> float:
    """The $/h a rental of `offer` is billed while it runs: the bid when interruptible, else dph_total."""
    bid = bid_price(offer, cfg)
    return float(offer["dph_total"]) if bid is None else bid


def bid_price(offer: dict, cfg: VastConfig) -> float | None:
    """The $/h to bid for an interruptible rental (None = on-demand at the offer's price)."""
    if not cfg.interruptible:
        return None
    minimum = float(offer.get("min_bid") or offer["dph_total"])
    return round(min(cfg.max_dollars_per_hour, minimum * cfg.bid_markup), 4)


@dataclass
class RankedOffers:
    """One search's offers, best first, tried in order: `next()` gives the best offer not tried and not on an
    excluded machine; `failed()` excludes the offer's machine for the rest of the run and records why."""
    offers: list[dict]
    excluded_machines: set[str]
    tried: list[tuple[dict, str]] = field(default_factory=list)

    def remaining(self) -> list[dict]:
        """The offers not tried yet and not on an excluded machine, best first."""
        tried = {str(offer.get("id")) for offer, _ in self.tried}
        return [o for o in self.offers if str(o.get("id")) not in tried
                and str(o.get("machine_id")) not in self.excluded_machines]

    def next(self) -> dict | None:
        return next(iter(self.remaining()), None)

    def failed(self, offer: dict, reason: str, ledger=None, run_id: str | None = None) -> None:
        """The offer failed (create refused, stuck loading, SSH never answered): its machine is out for the run."""
        self.tried.append((offer, reason))
        machine = str(offer.get("machine_id"))
        self.excluded_machines.add(machine)
        if ledger is not None:
            ledger.event(run_id, EXCLUDED_EVENT, offer_id=str(offer.get("id")), machine_id=machine,
                         reason=reason[:300])


def plan_rows(offers: list[dict], cfg: VastConfig) -> list[dict]:
    """The ranked list as the plan shows it: rank, offer, machine, GPUs, the $/h billed, reliability."""
    return [{"rank": n, "offer_id": offer.get("id"), "machine_id": offer.get("machine_id"),
             "gpus": f"{offer.get('num_gpus')}x {offer.get('gpu_name')}",
             "dollars_per_hour": contract_rate(offer, cfg),
             "kind": "bid" if cfg.interruptible else "on-demand",
             "reliability": reliability_of(offer),
             "dollars_per_reliable_hour": contract_rate(offer, cfg) / reliability_of(offer)}
            for n, offer in enumerate(offers, start=1)]


def format_plan(rows: list[dict]) -> list[str]:
    """Plan lines for the ranked offers (best first)."""
    if not rows:
        return ["  no offer matches the vast: query"]
    return [f"  {row['rank']:>2}. offer {row['offer_id']} (machine {row['machine_id']}) {row['gpus']}: "
            f"${row['dollars_per_hour']:.3f}/h {row['kind']}, reliability {row['reliability']:.3f}"
            for row in rows]


@dataclass(frozen=True)
class OutbidChoice:
    action: str                 # "wait" (for the own instance to resume) or "move" (to the best offer now)
    wait_dollars: float | None  # None: no expected wait known
    move_dollars: float


def after_outbid(*, own_rate: float, own_storage_per_hour: float, best_rate: float, boot_hours: float,
                 redo_hours: float, remaining_hours: float, expected_wait_hours: float | None) -> OutbidChoice:
    """Wait for an outbid instance to resume, or continue on the best offer now: whichever is expected to cost less.

    wait: the stopped instance's storage for the expected wait, then the remaining work at its own rate (its disk
          keeps the newest checkpoint, nothing is redone);
    move: a new instance boots and redoes the steps since the last pulled checkpoint, then the remaining work,
          all at the best offer's rate (the outbid instance is destroyed: no more storage).
    An unknown wait moves."""
    move = best_rate * (boot_hours + redo_hours + remaining_hours)
    if expected_wait_hours is None:
        return OutbidChoice("move", None, move)
    wait = own_storage_per_hour * expected_wait_hours + own_rate * remaining_hours
    return OutbidChoice("wait" if wait < move else "move", wait, move)
