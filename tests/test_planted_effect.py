"""A study with planted effects, run through `armature ablation`, must reach the right verdicts:
an arm crippled by a learning rate near zero is `worse`; an arm that only draws a fresh sample of the
same data distribution (data.seed) is neither `better` nor `worse`; the baseline is `baseline`.

Three seeds are often not enough for a paired t-test to decide even a large effect once Holm has
corrected for two arms (2 degrees of freedom: t must pass 4.3 at p = 0.05, and 6.2 at 0.025), so
the study asks for adaptive seeds: arms still open after three get more, one round at a time."""

import csv

from tests.armature_helpers import armature, tiny_spec

STUDY = """
name: planted
trainer: dcgan
seeds: {min: 3, max: 5}
metric: {name: kid_scratchenc, mode: min}
baseline: baseline
base:
  steps: 150
  lr: 1.0e-3
  batch_size: 32
  g_width: 16
  d_width: 16
  log_every: 10
  eval_every: 150
  checkpoint_every: 150
  eval_average: 1
  eval_samples: 128
  data.num_train: 256
  data.num_heldout: 128
  judge.steps: 60
arms:
  - name: baseline
  - name: crippled
    description: a learning rate near zero, so the generator stays at its initialisation
    set: {lr: 1.0e-9}
  - name: fresh-draw
    description: another draw of the same procedural distribution; nothing else changes
    set: {data.seed: 999}
resources: {gpus: 0, cpus: 1}
"""


def test_planted_effects_get_the_right_verdicts(tmp_path):
    home = tmp_path / "home"
    spec = tiny_spec(tmp_path, STUDY)
    result = armature(home, "ablation", str(spec), "--run-id", "planted", "--metrics-port", "-1", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["arm"]: row for row in csv.DictReader(open(home / "planted" / "results.csv"))}
    assert all(int(row["n_succeeded"]) >= 3 and row["n_failed"] == "0" for row in rows.values()), rows
    assert rows["baseline"]["verdict"] == "baseline"
    assert rows["crippled"]["verdict"] == "worse", rows["crippled"]
    assert float(rows["crippled"]["diff_ci_low"]) > 0, "KID is lower-is-better: the crippled arm's is higher"
    assert rows["fresh-draw"]["verdict"] == "inconclusive", rows["fresh-draw"]
    assert int(rows["fresh-draw"]["n_succeeded"]) == 5, "an open verdict gets seeds up to max"
    answer = (home / "planted" / "results.md").read_text()
    assert "crippled" in answer.split("## ")[0], "results.md opens with the answer"
