"""Offers (rentable machines) and the search-query language of POST /bundles/.

A query is a dict of ``field: {operator: value}``; values often arrive as
strings ("1", "0.98", "true") because the SDK's query parser produces them,
so each value is coerced to the type of the offer's field before comparing.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

# Keys of a search body that are options, not field filters.
SEARCH_OPTIONS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}

OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin", "nin")

# Simulator-only offer keys, not sent to API clients. `capacity`: how many rentals the offer's machines hold
# at once (None: unlimited); with a capacity, rentals compete in the bid market (Simulator._settle_market).
SIM_ONLY_KEYS = {"boot_delay_s", "capacity"}

DEFAULT_BOOT_DELAY_S = 4.0

DEFAULT_OFFERS = [
    {"id": 1001, "machine_id": 501, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.35, "reliability2": 0.995, "geolocation": "US", "boot_delay_s": 3.0},
    {"id": 1002, "machine_id": 502, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.29, "reliability2": 0.962, "geolocation": "PL", "boot_delay_s": 6.0},
    {"id": 1003, "machine_id": 503, "gpu_name": "RTX 4090", "num_gpus": 2, "gpu_ram": 24564,
     "dph_total": 0.74, "reliability2": 0.991, "geolocation": "DE", "boot_delay_s": 4.0},
    {"id": 1004, "machine_id": 504, "gpu_name": "RTX 4090", "num_gpus": 4, "gpu_ram": 24564,
     "dph_total": 1.52, "reliability2": 0.988, "geolocation": "US", "boot_delay_s": 5.0},
    {"id": 1005, "machine_id": 505, "gpu_name": "RTX 3090", "num_gpus": 1, "gpu_ram": 24576,
     "dph_total": 0.17, "reliability2": 0.984, "geolocation": "CA", "boot_delay_s": 3.0},
    {"id": 1006, "machine_id": 506, "gpu_name": "RTX 3090", "num_gpus": 2, "gpu_ram": 24576,
     "dph_total": 0.36, "reliability2": 0.993, "geolocation": "US", "boot_delay_s": 4.0},
    {"id": 1007, "machine_id": 507, "gpu_name": "A100 SXM4", "num_gpus": 1, "gpu_ram": 81920,
     "dph_total": 1.05, "reliability2": 0.998, "geolocation": "US", "boot_delay_s": 5.0,
     "cuda_max_good": 12.6},
    {"id": 1008, "machine_id": 508, "gpu_name": "A100 SXM4", "num_gpus": 4, "gpu_ram": 81920,
     "dph_total": 4.30, "reliability2": 0.996, "geolocation": "NL", "boot_delay_s": 8.0,
     "cuda_max_good": 12.6},
    {"id": 1009, "machine_id": 509, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
     "dph_total": 0.24, "reliability2": 0.91, "verified": False, "geolocation": "BR",
     "boot_delay_s": 10.0},
]


def normalize_offer(config: dict) -> dict:
    """A full offer row from a config that names at least id, gpu_name, num_gpus, dph_total."""
    for required in ("id", "gpu_name", "num_gpus", "dph_total"):
        if required not in config:
            raise ValueError(f"offer config needs {required!r}: {config}")
    num_gpus = int(config["num_gpus"])
    dph_total = float(config["dph_total"])
    gpu_ram = int(config.get("gpu_ram", 24576))
    reliability = float(config.get("reliability2", config.get("reliability", 0.99)))
    offer = {
        "id": int(config["id"]),
        "ask_contract_id": int(config["id"]),
        "machine_id": int(config.get("machine_id", config["id"])),
        "host_id": int(config.get("host_id", 90000 + int(config.get("machine_id", config["id"])))),
        "gpu_name": config["gpu_name"],
        "num_gpus": num_gpus,
        "gpu_ram": gpu_ram,
        "gpu_total_ram": gpu_ram * num_gpus,
        "gpu_frac": 1.0,
        "gpu_arch": "nvidia",
        "gpu_display_active": False,
        "gpu_mem_bw": 900.0,
        "gpu_max_power": 450.0,
        "gpu_max_temp": 83.0,
        "compute_cap": 890,
        "bw_nvlink": 0.0,
        "dph_total": dph_total,
        "dph_base": dph_total,
        "min_bid": round(dph_total * 0.6, 4),
        "storage_cost": 0.15,
        "inet_up_cost": 0.0,
        "inet_down_cost": 0.0,
        "reliability": reliability,
        "reliability2": reliability,
        "verified": True,
        "verification": "verified",
        "rentable": True,
        "rented": False,
        "external": False,
        "hosting_type": 0,
        "cuda_max_good": 12.4,
        "driver_version": "550.54.15",
        "inet_down": 850.0,
        "inet_up": 700.0,
        "disk_space": 200.0,
        "disk_bw": 2500.0,
        "cpu_arch": "amd64",
        "cpu_cores": 16 * num_gpus,
        "cpu_cores_effective": 8.0 * num_gpus,
        "cpu_ghz": 3.6,
        "cpu_ram": 64000 * num_gpus,
        "has_avx": 1,
        "pci_gen": 4.0,
        "pcie_bw": 24.0,
        "mobo_name": "vastsim",
        "direct_port_count": 64,
        "static_ip": False,
        "vms_enabled": False,
        "ubuntu_version": "22.04",
        "geolocation": "US",
        "datacenter": False,
        "cluster_id": None,
        "duration": 30 * 24 * 3600.0,
        "total_flops": 80.0 * num_gpus,
        "dlperf": 60.0 * num_gpus,
        "boot_delay_s": DEFAULT_BOOT_DELAY_S,
        "capacity": None,
    }
    offer.update({k: v for k, v in config.items() if k != "reliability2" and k != "reliability"})
    offer["dph_total"] = float(offer["dph_total"])
    offer["dlperf_per_dphtotal"] = offer["dlperf"] / offer["dph_total"] if offer["dph_total"] else 0.0
    offer["flops_per_dphtotal"] = offer["total_flops"] / offer["dph_total"] if offer["dph_total"] else 0.0
    offer["score"] = round(offer["dlperf_per_dphtotal"] * offer["reliability2"], 3)
    return offer


def public_offer(offer: dict) -> dict:
    """The offer as an API client sees it."""
    return {k: copy.deepcopy(v) for k, v in offer.items() if k not in SIM_ONLY_KEYS}


class QueryError(ValueError):
    """A search or filter query that cannot be evaluated."""


def coerce_like(value: Any, example: Any) -> Any:
    """``value`` (often a string) converted to the type of ``example``."""
    if value is None or example is None:
        return value
    if isinstance(example, bool):
        if isinstance(value, bool):
            return value
        return str(value).strip().lower() in ("true", "1", "yes")
    if isinstance(example, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise QueryError(f"{value!r} is not a number") from err
    return str(value)


def value_matches(actual: Any, operator: str, wanted: Any) -> bool:
    """Whether a row's ``actual`` value satisfies ``operator wanted``."""
    if operator not in OPERATORS:
        raise QueryError(f"unknown operator {operator!r}; use one of {', '.join(OPERATORS)}")
    if operator in ("in", "notin", "nin"):
        choices = wanted if isinstance(wanted, list) else [wanted]
        found = actual in [coerce_like(choice, actual) for choice in choices]
        return found if operator == "in" else not found
    wanted = coerce_like(wanted, actual)
    if operator == "eq":
        return actual == wanted
    if operator == "neq":
        return actual != wanted
    if actual is None or wanted is None:
        return False
    if operator == "gt":
        return actual > wanted
    if operator == "gte":
        return actual >= wanted
    if operator == "lt":
        return actual < wanted
    return actual <= wanted


def row_matches(row: dict, filters: dict) -> bool:
    """Whether ``row`` passes every ``field: {operator: value}`` filter (missing field = no match)."""
    for field, conditions in filters.items():
        if not isinstance(conditions, dict):
            conditions = {"eq": conditions}
        if field not in row:
            return False
        for operator, wanted in conditions.items():
            if not value_matches(row[field], operator, wanted):
                return False
    return True


def sort_rows(rows: list[dict], order: Iterable) -> list[dict]:
    """Rows sorted by ``[[field, "asc"|"desc"], ...]``; missing values sort last."""
    rows = list(rows)
    for field, direction in reversed([tuple(pair) for pair in order or []]):
        descending = str(direction).lower().startswith("desc")
        present = [r for r in rows if r.get(field) is not None]
        missing = [r for r in rows if r.get(field) is None]
        present.sort(key=lambda r: r[field], reverse=descending)
        rows = present + missing
    return rows


def search(offers: Iterable[dict], query: dict) -> list[dict]:
    """The offers a search body selects, ordered and limited as it asks."""
    offers = list(offers)
    filters = {k: v for k, v in query.items() if k not in SEARCH_OPTIONS}
    known_fields = set().union(*(o.keys() for o in offers)) if offers else set()
    unknown = sorted(set(filters) - known_fields)
    if unknown and offers:
        raise QueryError(f"unknown offer field(s): {', '.join(unknown)}")
    selected = [o for o in offers if row_matches(o, filters)]
    selected = sort_rows(selected, query.get("order") or [["score", "desc"]])
    if query.get("limit") is not None:
        selected = selected[: int(query["limit"])]
    return [public_offer(o) for o in selected]
