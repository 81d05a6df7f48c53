"""Charges: what each instance has cost, in the shapes the SDK's billing calls read.

Rules (so a cost report can reconcile against them):

* GPU: the instance's ``dph_total`` $/h (its bid for an interruptible one) for
  every second it is ``running``; nothing while it is being created or loading,
  stopped (by the user or outbid), exited (preempted) or offline.
* Storage: ``disk_gb * storage_cost`` $/GB/month (month = 30 days) for every
  second from the create request to the confirmed destroy, whatever the state.
* Bandwidth: ``inet_up_cost`` / ``inet_down_cost`` $/GB (GB = 1e9 bytes) of the
  traffic recorded against the instance (``Simulator.add_traffic``).

One charge line per instance (not split per day), open-ended while it lives;
amounts are unrounded dollars.
"""

from __future__ import annotations

MONTH_S = 30 * 24 * 3600.0
BYTES_PER_GB = 1e9


def gpu_seconds(billing_periods: list[list], now: float) -> float:
    return sum((end if end is not None else now) - start for start, end in billing_periods)


def charge_line(instance: dict, now: float) -> dict:
    """One instance's charge line; ``instance`` is the simulator's record."""
    end = instance["destroyed_at"] or now
    storage_s = end - instance["created_at"]
    gpu_s = gpu_seconds(instance["billing_periods"], now)
    gpu_amount = instance["dph_total"] * gpu_s / 3600.0
    storage_amount = instance["disk_gb"] * instance["storage_cost"] * storage_s / MONTH_S
    bandwidth_amount = (instance["bytes_up"] * instance["inet_up_cost"]
                        + instance["bytes_down"] * instance["inet_down_cost"]) / BYTES_PER_GB
    source = f"instance-{instance['id']}"
    label = instance.get("label") or ""
    metadata = {
        "instance_id": instance["id"],
        "label": label,
        "gpu_name": instance["gpu_name"],
        "num_gpus": instance["num_gpus"],
        "dph_total": instance["dph_total"],
        "gpu_seconds": gpu_s,
        "storage_seconds": storage_s,
        "disk_gb": instance["disk_gb"],
        "storage_cost": instance["storage_cost"],
        "gpu_amount": gpu_amount,
        "storage_amount": storage_amount,
        "bandwidth_amount": bandwidth_amount,
        "bytes_up": instance["bytes_up"],
        "bytes_down": instance["bytes_down"],
        "is_bid": instance["is_bid"],
        "live": instance["destroyed_at"] is None,
    }

    def item(kind: str, amount: float, description: str) -> dict:
        return {"type": kind, "source": source, "description": description, "amount": amount,
                "start": instance["created_at"], "end": end, "items": [], "metadata": {"instance_id": instance["id"]}}

    return {
        "id": instance["id"],
        "type": "instance",
        "source": source,
        "description": f"{instance['num_gpus']}x {instance['gpu_name']} instance {instance['id']}"
                       + (f" ({label})" if label else ""),
        "amount": gpu_amount + storage_amount + bandwidth_amount,
        "start": instance["created_at"],
        "end": end,
        "items": [
            item("gpu", gpu_amount, f"GPU ${instance['dph_total']}/h x {gpu_s / 3600.0:.6f} h"),
            item("storage", storage_amount,
                 f"Storage {instance['disk_gb']} GB x ${instance['storage_cost']}/GB/month x {storage_s:.1f} s"),
            item("bandwidth", bandwidth_amount,
                 f"Bandwidth {instance['bytes_up'] / BYTES_PER_GB:.6f} GB up, "
                 f"{instance['bytes_down'] / BYTES_PER_GB:.6f} GB down"),
        ],
        "metadata": metadata,
    }


def _in_window(line: dict, window: dict) -> bool:
    start_min = window.get("gte", window.get("gt"))
    end_max = window.get("lte", window.get("lt"))
    if start_min is not None and line["end"] < float(start_min):
        return False
    if end_max is not None and line["start"] > float(end_max):
        return False
    return True


def charges_page(lines: list[dict], select_filters: dict, latest_first: bool, limit: int,
                 after_token: str | None) -> dict:
    """GET /api/v0/charges/: ``{results, count, total, next_token}``."""
    window = (select_filters or {}).get("day") or {}
    kinds = ((select_filters or {}).get("type") or {}).get("in")
    selected = [line for line in lines if _in_window(line, window) and (not kinds or line["type"] in kinds)]
    selected.sort(key=lambda line: (line["start"], line["id"]), reverse=bool(latest_first))
    offset = int(after_token or 0)
    limit = max(1, min(int(limit or 20), 100))
    page = selected[offset:offset + limit]
    more = offset + limit < len(selected)
    return {"results": page, "count": len(page), "total": len(selected),
            "next_token": str(offset + limit) if more else None}


def legacy_invoices(lines: list[dict], sdate: float, edate: float, initial_credit: float,
                    account_created_at: float) -> dict:
    """GET /users/me/invoices: ``{invoices, current}``; destroyed instances are invoice rows."""
    rows = [{"id": 1, "type": "payment", "description": "vastsim starting credit", "quantity": 1,
             "rate": initial_credit, "amount": initial_credit, "timestamp": account_created_at}]
    for line in lines:
        if line["metadata"]["live"]:
            continue
        rows.append({
            "id": line["id"], "type": "charge", "instance_id": line["id"],
            "description": line["description"],
            "quantity": line["metadata"]["gpu_seconds"] / 3600.0,
            "rate": line["metadata"]["dph_total"], "amount": line["amount"], "timestamp": line["end"],
        })
    rows = [r for r in rows if sdate <= r["timestamp"] <= edate]
    live = sum(line["amount"] for line in lines if line["metadata"]["live"])
    return {"invoices": rows, "current": {"charges": live, "service_fee": 0.0, "total": live}}
