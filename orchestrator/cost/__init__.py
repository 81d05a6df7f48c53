"""What studies, arms and attempts cost, where the money went, how much was waste,
and whether it matches what the provider billed.

    current_spend(ledger, run_id) / burn_rate(ledger)    cheap totals for the exporter and budgets
    cost_lines(ledger, run_ids)                          the full model (model.py)
    reconcile / fetch_provider_charges                   estimate vs billed (reconcile.py)
    estimate_study / record_estimate                     before a run (estimate.py)
    RaplMeter                                            CPU package energy of local CPU attempts (energy.py)
    cost_command(ledger, ...)                            `armature cost` (command.py, report.py)
"""

from orchestrator.cost.command import cost_command, parse_date
from orchestrator.cost.estimate import (Estimate, estimate_study, local_dollars_per_hour, record_estimate,
                                        recorded_estimates)
from orchestrator.cost.model import CostLine, Rates, burn_rate, cost_lines, current_spend
from orchestrator.cost.reconcile import InstanceReconciliation, fetch_provider_charges, reconcile

__all__ = [
    "CostLine", "Estimate", "InstanceReconciliation", "Rates", "burn_rate", "cost_command", "cost_lines",
    "current_spend", "estimate_study", "fetch_provider_charges", "local_dollars_per_hour", "parse_date",
    "reconcile", "record_estimate", "recorded_estimates",
]
