"""The arms spec: parsing, expansion, and every kind of bad input (clear message, nothing written)."""

import json
import subprocess
import sys

import pytest

from orchestrator.errors import SpecError
from orchestrator.paths import REPO_ROOT
from orchestrator.spec import flatten, load_plan, unflatten
from tests.armature_helpers import armature, tiny_spec

VQ = """name: study
trainer: vqvae
metric: {name: recon_mse, mode: min}
"""


def plan_of(tmp_path, body, sets=(), yes=False):
    return load_plan(tiny_spec(tmp_path, body), list(sets), yes)


def test_arms_times_seeds_with_deep_merge(tmp_path):
    plan = plan_of(tmp_path, VQ + """
base: {steps: 30, model: {channels: 8}, vq.beta: 0.5}
arms:
  - name: base-arm
  - name: small
    set: {model.codebook_size: 16}
seeds: [3, 7]
baseline: base-arm
""")
    assert [(r.arm, r.seed) for r in plan.arm_runs] == [("base-arm", 3), ("base-arm", 7), ("small", 3), ("small", 7)]
    small = plan.arm_runs[2].config
    assert small["model"]["codebook_size"] == 16 and small["model"]["channels"] == 8
    assert small["vq"]["beta"] == 0.5 and small["steps"] == 30 and small["seed"] == 3
    assert plan.arm_runs[0].config["model"]["codebook_size"] != 16
    assert len({r.config_hash for r in plan.arm_runs}) == 4


def test_grid_expands_with_readable_names(tmp_path):
    plan = plan_of(tmp_path, VQ + """
arms: [{name: a}, {name: b, set: {vq.ema: false}}]
grid: {lr: [0.001, 0.0003], model.codebook_size: [16, 64]}
""")
    names = sorted({r.arm for r in plan.arm_runs})
    assert len(names) == 8
    assert "a@lr=0.001_codebook_size=16" in names and "b@lr=0.0003_codebook_size=64" in names
    run = next(r for r in plan.arm_runs if r.arm == "b@lr=0.0003_codebook_size=64")
    assert run.config["lr"] == 0.0003 and run.config["model"]["codebook_size"] == 64 and run.config["vq"]["ema"] is False


def test_grid_alone_names_arms_by_values(tmp_path):
    plan = plan_of(tmp_path, VQ + "grid: {lr: [0.1, 0.2]}\nseeds: 2\n")
    assert sorted({r.arm for r in plan.arm_runs}) == ["lr=0.1", "lr=0.2"]
    assert len(plan.arm_runs) == 4


def test_set_overrides_spec_and_base(tmp_path):
    plan = plan_of(tmp_path, VQ + "base: {steps: 30}\n",
                   sets=["base.steps=7", "seeds=3", "resources.gpus=0.5", "base.model.channels=4"])
    assert {r.seed for r in plan.arm_runs} == {0, 1, 2}
    assert all(r.config["steps"] == 7 and r.config["model"]["channels"] == 4 for r in plan.arm_runs)
    assert plan.study.resources.gpus == 0.5


def test_upstream_runs_are_shared_by_identical_tokenizer_configs(tmp_path):
    plan = plan_of(tmp_path, """name: mg
trainer: maskgit
metric: {name: heldout_masked_acc, mode: max}
arms:
  - name: a
  - name: b
    set: {decode_steps: 4}
  - name: c
    set: {tokenizer.model.codebook_size: 16}
seeds: 2
""")
    assert len(plan.upstreams) == 2
    a, b, c = (next(r for r in plan.arm_runs if r.arm == n) for n in "abc")
    assert a.upstream["tokenizer_dir"] is b.upstream["tokenizer_dir"]
    assert c.upstream["tokenizer_dir"] is not a.upstream["tokenizer_dir"]


def test_flatten_roundtrip():
    tree = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 3}
    assert unflatten(flatten(tree)) == tree
    with pytest.raises(ValueError):
        unflatten({"a": 1, "a.b": 2})


@pytest.mark.parametrize("body, sets, expected", [
    (VQ + "arms: [{name: a, set: {model.codebok_size: 3}}]\n", [],
     ["spec.yaml:4", "arm 'a'", "unknown key 'model.codebok_size'", "closest valid keys: model.codebook_size"]),
    (VQ + "arms: [{name: a}, {name: b, set: {steps: 500}}]\n", [],
     ["arms 'a' and 'b' resolve to the identical config"]),
    ("name: s\ntrainer: !!python/object/apply:os.system [echo hi]\n", [], ["spec.yaml:2", "YAML tags are not allowed"]),
    ("a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(f"k{i}: [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n" for i in range(8)), [],
     ["more than 50 YAML aliases"]),
    (VQ.replace("vqvae", "vqvea"), [], ["spec.yaml:2", "unknown trainer 'vqvea'", "did you mean vqvae"]),
    (VQ + "seeds: 0\nresources: {gpus: 1.5}\n", [], ["spec.yaml:4: seeds", "spec.yaml:5: resources.gpus"]),
    (VQ + "colour: blue\n", [], ["spec.yaml:4: colour: unknown field"]),
    (VQ.replace("recon_mse", "fid"), [], ["metric 'fid' is not one of trainer vqvae's metrics", "recon_mse"]),
    (VQ.replace("mode: min", "mode: max"), [], ["spec.yaml:3", "recon_mse is better when minimised"]),
    (VQ + "baseline: nope\n", [], ["spec.yaml:4", "baseline 'nope' is not an arm"]),
    (VQ + "base: {seed: 3}\n", [], ["set replicates with `seeds:`"]),
    (VQ, ["base.steps"], ["--set 'base.steps': expected KEY=VALUE"]),
    (VQ, ["nonsense.key=1"], ["--set nonsense.key"]),
    (VQ, ["base.lr=fast"], ["--set base.lr", "arm 'base': lr"]),
    (VQ + "arms: [{name: 'bad name'}]\n", [], ["spec.yaml:4", "arms.0.name"]),
    ("name: [unclosed\n", [], ["spec.yaml:", "invalid YAML"]),
    ("- just\n- a list\n", [], ["expected a mapping"]),
])
def test_bad_input_names_file_field_and_line(tmp_path, body, sets, expected):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, body, sets)
    for fragment in expected:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_large_grid_needs_yes(tmp_path):
    body = VQ + "grid: {lr: [1, 2, 3, 4, 5, 6, 7, 8, 9]}\nseeds: 8\n"
    with pytest.raises(SpecError, match="needs --yes"):
        plan_of(tmp_path, body)
    assert len(plan_of(tmp_path, body, yes=True).arm_runs) == 72


def test_cli_bad_spec_prints_no_traceback_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    spec = tiny_spec(tmp_path, VQ + "arms: [{name: a, set: {model.codebok_size: 3}}]\n")
    for command in (["ablation", str(spec)], ["validate", str(spec)]):
        result = armature(home, *command)
        assert result.returncode == 2
        assert "unknown key 'model.codebok_size'" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not home.exists()
    missing = armature(home, "ablation", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml: no such file" in missing.stderr and not home.exists()


def test_validate_prints_plan_and_dry_run_writes_nothing(tmp_path):
    home = tmp_path / "home"
    result = armature(home, "validate", "arms/maskgit.yaml")
    assert result.returncode == 0, result.stderr
    for arm in ("baseline", "small-codebook", "dead-code-reset", "linear-schedule", "fewer-decode-steps"):
        assert arm in result.stdout
    assert "10 arm runs = 5 arms x 2 seeds" in result.stdout
    assert "one vqvae run shared by" in result.stdout
    assert armature(home, "ablation", "arms/maskgit.yaml", "--dry-run").returncode == 0
    assert not home.exists()


def test_schema_is_json_schema_of_the_spec():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "schema"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    schema = json.loads(out.stdout)
    assert {"name", "trainer", "arms", "grid", "seeds", "metric", "resources", "budget", "vast"} <= set(
        schema["properties"])
    assert "name" in schema["required"] and "metric" in schema["required"]
