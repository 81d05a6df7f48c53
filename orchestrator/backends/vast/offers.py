"""Which Vast offers to rent: the search query from a VastConfig, and the ranking of the answers.

The query is Vast's JSON search language (vast-api.md): `field: {op: value}`
with numbers as strings, as the SDK's own query parser sends them. Offers are
ranked by price per reliable hour (dph_total / reliability), so a slightly
dearer machine that rarely fails beats a cheap one that often does; machines
that already failed in this run are left out.
"""

from __future__ import annotations

from typing import Iterable

from orchestrator.backends.vast.config import VastConfig


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


def rank(offers: Iterable[dict], exclude_machines: set[str], exclude_offers: set[str] = frozenset()) -> list[dict]:
    """Offers best first (lowest dph_total / reliability), without excluded machines and offers."""
    usable = [o for o in offers
              if str(o.get("machine_id")) not in exclude_machines and str(o.get("id")) not in exclude_offers
              and o.get("dph_total") is not None]
    return sorted(usable, key=lambda o: (float(o["dph_total"]) / reliability_of(o), -reliability_of(o)))


def bid_price(offer: dict, cfg: VastConfig) -> float | None:
    """The $/h to bid for an interruptible rental (None = on-demand at the offer's price)."""
    if not cfg.interruptible:
        return None
    minimum = float(offer.get("min_bid") or offer["dph_total"])
    return round(min(cfg.max_dollars_per_hour, minimum * cfg.bid_markup), 4)
