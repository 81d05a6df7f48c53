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


@pytest.mark.parametrize("grid, shown", [
    ('{steps: [5, 6], data.cache_dir: ["/tmp/a/b", "/tmp/a-b"]}', "data.cache_dir: values '/tmp/a/b' and '/tmp/a-b'"),
    ("{steps: [5, 6], lr: [1e-3, 0.001]}", "lr: values '1e-3' and 0.001"),      # YAML reads 1e-3 as a string
    ("{lr: [0.001, 0.0010]}", "lr: values 0.001 and 0.001"),
])
def test_grid_values_with_one_label_are_refused(tmp_path, grid, shown):
    with pytest.raises(SpecError) as err:
        plan_of(tmp_path, VQ + f"grid: {grid}\n")
    message = str(err.value)
    assert "spec.yaml:4: grid " + shown in message and "distinct values" in message


def test_set_overrides_spec_and_base(tmp_path):
    plan = plan_of(tmp_path, VQ + "base: {steps: 30}\n",
                   sets=["base.steps=7", "seeds=3", "resources.gpus=0.5", "base.model.channels=4"])
    assert {r.seed for r in plan.arm_runs} == {0, 1, 2}
    assert all(r.config["steps"] == 7 and r.config["model"]["channels"] == 4 for r in plan.arm_runs)
    assert plan.study.resources.gpus == 0.5


MASKGIT = """name: mg
trainer: maskgit
metric: {name: heldout_masked_acc, mode: max}
baseline: a
"""


def test_upstream_runs_are_replicated_per_seed_and_shared_by_arms(tmp_path):
    plan = plan_of(tmp_path, MASKGIT + """
base: {data.num_train: 256}
arms:
  - name: a
  - name: b
    set: {decode_steps: 4}
  - name: c
    set: {tokenizer.model.codebook_size: 16, tokenizer.data.num_train: 128}
seeds: 2
""")
    # a and b share a tokenizer config: one tokenizer run per seed for both; c has its own per seed
    assert len([up for up in plan.upstreams if up.trainer == "vqvae"]) == 4
    for seed in (0, 1):
        a, b, c = (next(r for r in plan.arm_runs if r.arm == n and r.seed == seed) for n in "abc")
        shared = a.upstream["tokenizer_dir"]
        assert b.upstream["tokenizer_dir"] is shared and c.upstream["tokenizer_dir"] is not shared
        for run in (a, b, c):
            assert run.config["seed"] == seed and run.config["data"]["draw"] == seed
            tokenizer = run.upstream["tokenizer_dir"]
            assert tokenizer.seed == seed and tokenizer.config["data"]["draw"] == seed
            assert run.config["tokenizer"] == tokenizer.config       # the arm's config records its upstream's
        assert shared.config["data"] == a.config["data"]            # the tokenizer trains on the arm's data
        assert c.upstream["tokenizer_dir"].config["data"]["num_train"] == 128   # unless the spec sets its data
    seed0 = next(r for r in plan.arm_runs if r.arm == "a" and r.seed == 0).upstream["tokenizer_dir"]
    seed1 = next(r for r in plan.arm_runs if r.arm == "a" and r.seed == 1).upstream["tokenizer_dir"]
    assert seed0 is not seed1 and seed0.name != seed1.name


CROSS_FAMILY = """name: families
trainer: dcgan
metric: {name: kid_scratchenc, mode: min}
baseline: gan
base: {steps: 20, judge.steps: 50}
arms:
  - name: gan
  - name: vae
    trainer: vae
    set: {data.num_train: 512}
  - name: latent
    trainer: latent_diffusion
    set: {beta: 0.5}
seeds: 2
"""


def test_the_judge_is_one_run_per_seed_shared_by_every_arm_of_every_trainer(tmp_path):
    plan = plan_of(tmp_path, CROSS_FAMILY.replace("beta: 0.5", "lr: 0.001"))
    assert {r.arm: r.trainer for r in plan.arm_runs} == {"gan": "dcgan", "vae": "vae", "latent": "latent_diffusion"}
    baseline_data = next(r for r in plan.arm_runs if r.arm == "gan").config["data"]
    judges = [up for up in plan.upstreams if up.trainer == "judge"]
    assert [j.seed for j in judges] == [0, 1]
    for seed, judge in enumerate(judges):
        assert judge.config["steps"] == 50
        assert judge.config["data"] == {**baseline_data, "draw": seed}     # the vae arm's 512 images do not reach it
        runs = [r for r in plan.arm_runs if r.seed == seed]
        assert all(r.upstream["judge_dir"] is judge for r in runs)
        latent = next(r for r in runs if r.arm == "latent")
        autoencoder = latent.upstream["autoencoder_dir"]
        assert autoencoder.seed == seed and autoencoder.upstream["judge_dir"] is judge   # the VAE it trains, too
    assert plan.upstreams.index(judges[0]) < plan.upstreams.index(
        next(r for r in plan.arm_runs if r.arm == "latent").upstream["autoencoder_dir"])


@pytest.mark.parametrize("change, expected", [
    (("data.num_train: 512", "judge.steps: 10"), "spec.yaml:10: arm 'vae': judge.steps: the judge (judge) is shared "
                                                 "by every arm of the study"),
    (("lr: 0.001", "autoencoder.judge_dir: /x"), "arm 'latent': autoencoder.judge_dir: the autoencoder.judge"),
    (("data.num_train: 512", "data.resolution: 32"), "spec.yaml:10: arm 'vae': data.resolution 32 differs from "
                                                     "the judge's 16 (the baseline's data)"),
])
def test_an_arm_cannot_change_the_judge(tmp_path, change, expected):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, CROSS_FAMILY.replace("beta: 0.5", "lr: 0.001").replace(*change))
    assert expected in str(info.value)


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
    (VQ + "arms: [{name: a, set: {data.draw: 2}}]\n", [], ["spec.yaml:4", "data.draw: each replicate gets"]),
    (VQ + "seeds: {min: 1, max: 4}\n", [], ["spec.yaml:4: seeds", "min: Input should be greater than or equal to 2"]),
    (VQ + "seeds: {min: 4, max: 2}\n", [], ["spec.yaml:4: seeds", "max (2) is below min (4)"]),
    (VQ + "seeds: {min: 3}\n", [], ["spec.yaml:4: seeds", "max: Field required"]),
    (VQ + "arms: [{name: a}, {name: b, set: {lr: 0.1}}]\nseeds: {min: 2, max: 4}\n", [],
     ["spec.yaml:5", "needs a `baseline:`"]),
    (VQ + "arms: [{name: a}, {name: g, trainer: dcgan}]\n", [],
     ["spec.yaml:4", "arm 'g': metric 'recon_mse' is not one of trainer dcgan's metrics"]),
    (VQ + "arms: [{name: a}, {name: g, trainer: dcgn}]\n", [], ["spec.yaml:4", "arm 'g'", "unknown trainer 'dcgn'"]),
    (VQ + "arms: [{name: a}, {name: v, trainer: vae, set: {vq.beta: 0.5}}]\n", [],
     ["spec.yaml:4", "arm 'v': unknown key 'vq' for trainer vae"]),
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


def test_metric_direction_must_agree_in_every_arms_trainer(tmp_path, monkeypatch):
    import trainers.vae
    monkeypatch.setitem(trainers.vae.METRICS, "recon_mse", "max")
    with pytest.raises(SpecError, match=r"spec.yaml:4: arm 'v': recon_mse is better when maximised in trainer vae"):
        plan_of(tmp_path, VQ + "arms: [{name: a}, {name: v, trainer: vae}]\n")


def test_arms_of_other_trainers_validate_against_their_own_config(tmp_path):
    plan = plan_of(tmp_path, VQ + """
base: {steps: 30}
arms:
  - name: vq
  - name: vae
    trainer: vae
    set: {beta: 0.5}
  - name: vae-again
    trainer: vae
seeds: 2
baseline: vq
""")
    assert {r.arm: r.trainer for r in plan.arm_runs} == {"vq": "vqvae", "vae": "vae", "vae-again": "vae"}
    vae = next(r for r in plan.arm_runs if r.arm == "vae")
    assert vae.config["beta"] == 0.5 and vae.config["steps"] == 30 and "vq" not in vae.config
    # the same overrides under two trainers are two different arms, not one config twice
    plan = plan_of(tmp_path, VQ + "arms: [{name: a}, {name: b, trainer: vae}]\n")
    assert [r.trainer for r in plan.arm_runs] == ["vqvae", "vae"]


def test_adaptive_seeds_start_with_min_and_say_so(tmp_path):
    body = VQ + "arms: [{name: a}, {name: b, set: {lr: 0.01}}]\nbaseline: a\nseeds: {min: 3, max: 8}\n"
    plan = plan_of(tmp_path, body)
    assert plan.study.adaptive and plan.study.max_seeds == 8
    assert sorted((r.arm, r.seed) for r in plan.arm_runs) == [(a, s) for a in "ab" for s in range(3)]
    assert plan_of(tmp_path, body, sets=["seeds={min: 2, max: 3}"]).study.max_seeds == 3
    assert not plan_of(tmp_path, body, sets=["seeds=4"]).study.adaptive
    result = armature(tmp_path / "home", "validate", str(tiny_spec(tmp_path, body)))
    assert result.returncode == 0, result.stderr
    assert "seeds: 3, up to 8 where the verdict is open" in result.stdout
    assert "each seed randomises: model initialisation" in result.stdout


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
    assert "arm runs = 5 arms x" in result.stdout
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


def test_each_data_draw_is_other_data_and_the_same_draw_is_the_same_data():
    from trainers.common import DataConfig
    from trainers.data import load_split
    from trainers.imagefolder import heldout_mask

    def images(draw, split="train"):
        return load_split(DataConfig(num_train=32, num_heldout=16, draw=draw), split)[0]

    assert (images(0) == load_split(DataConfig(num_train=32, num_heldout=16), "train")[0]).all()
    assert (images(1) == images(1)).all() and (images(1, "heldout") == images(1, "heldout")).all()
    assert (images(1) != images(0)).any() and (images(1, "heldout") != images(0, "heldout")).any()
    assert (images(1) != images(2)).any()

    paths = [f"photos/{i}.jpg" for i in range(400)]
    first, second = heldout_mask(paths, 0.25, draw=0), heldout_mask(paths, 0.25, draw=1)
    assert (first == heldout_mask(paths, 0.25)).all() and (second == heldout_mask(paths, 0.25, draw=1)).all()
    assert (first != second).any() and 60 < second.sum() < 140      # another quarter of the photos held out
