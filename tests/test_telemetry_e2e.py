"""A real Prometheus scrapes the exporter that a real `armature ablation` serves while it runs."""

import pytest

from tests.armature_helpers import TINY_VQVAE_BASE, ledger, start_armature, tiny_spec, wait_for
from tests.prom_helpers import NO_PROMETHEUS_REASON, PROMETHEUS, PROMTOOL, PrometheusServer, free_port, promtool, scrape

SPEC = f"""name: te
trainer: vqvae
metric: {{name: recon_mse, mode: min}}
base: {TINY_VQVAE_BASE.replace("steps: 20,", "steps: 200,").replace("eval_every: 10", "eval_every: 50")}
arms: [{{name: a}}, {{name: b, set: {{model.codebook_size: 16}}}}]
resources: {{gpus: 0}}
"""


@pytest.mark.skipif(not (PROMETHEUS and PROMTOOL), reason=NO_PROMETHEUS_REASON)
def test_prometheus_scrapes_a_live_ablation(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    with PrometheusServer(tmp_path / "prometheus", [f"127.0.0.1:{port}"]) as prometheus:
        proc = start_armature(home, "ablation", str(tiny_spec(tmp_path, SPEC)), "--run-id", "te",
                              "--metrics-port", str(port), log=tmp_path / "log")
        try:
            wait_for(lambda: prometheus.query('armature_arm_step{run="te"} > 20'), 180,
                     "Prometheus to see both arms stepping", interval=1)
            exposition = scrape(f"http://127.0.0.1:{port}/metrics")
            check = promtool("check", "metrics", stdin=exposition)
            assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
                check.stdout + check.stderr
            running = prometheus.query('armature_arm_state{run="te", state="running"}')
            assert {s["metric"]["arm"] for s in running} <= {"a", "b"} and running
            assert prometheus.query('armature_arm_steps_per_second{run="te"} > 0')
            assert proc.wait(240) == 0, (tmp_path / "log").read_text()
        finally:
            proc.kill()
        last = prometheus.query('max_over_time(armature_arm_step{run="te"}[10m])')
        assert sorted(s["metric"]["arm"] for s in last) == ["a", "b"]
        recorded = {r["arm"]: r["last_step"] for r in ledger(home).arm_runs("te")}
        for series in last:
            assert 20 < float(series["value"][1]) <= recorded[series["metric"]["arm"]]
