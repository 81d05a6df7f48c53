"""
Shared plumbing for every trainer: config base classes, the Run object (metrics, checkpoints,
resume, SIGTERM, sample grids, summary, artifact) and the `main` entry point.

Trainer contract (see DESIGN.md): `python -m trainers.<name> --config config.json --out DIR`.
Exit codes: 0 finished, 2 bad config, 3 diverged (NaN/inf loss), 143 interrupted by SIGTERM
(checkpoint saved), anything else = failure with a traceback on stderr.
"""

import argparse
import contextlib
import difflib
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

EXIT_OK = 0
EXIT_BAD_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 143


# -----------------------------------------------------------------------------
# configs

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["procedural", "folder"] = "procedural"
    resolution: int = 16          # procedural supports 16..64
    num_train: int = 2048         # procedural only
    num_heldout: int = 256        # procedural only
    seed: int = 1234              # dataset generation seed, independent of the training seed
    draw: int = 0                 # which draw of the data: procedural images, or the folder's held-out split
    families: list[str] | None = None  # procedural shape families, None = all
    path: str | None = None       # folder source: directory of images
    cache_dir: str | None = None  # folder source: where decoded/resized arrays are cached
    heldout_fraction: float = 0.1  # folder source
    drop_grayscale: bool = False  # folder source curation filters
    centered_only: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.draw < 0:
            raise ValueError(f"draw must be >= 0, got {self.draw}")
        if self.source == "procedural":
            if not 16 <= self.resolution <= 64:
                raise ValueError(f"procedural data supports resolution 16..64, got {self.resolution}")
            if self.num_train < 1 or self.num_heldout < 1:
                raise ValueError("num_train and num_heldout must be >= 1")
            if self.families is not None:
                from trainers.data import FAMILIES  # lazy: data.py imports this module
                unknown = [f for f in self.families if f not in FAMILIES]
                if unknown or not self.families:
                    raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")
        else:
            if not self.path:
                raise ValueError("source 'folder' needs data.path")
            if not 0.0 < self.heldout_fraction < 1.0:
                raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        return self


class TrainerConfig(BaseModel):
    """Base of every trainer's Config; subclasses give defaults for the required fields."""
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    steps: int
    batch_size: int
    lr: float
    log_every: int = 10
    eval_every: int
    checkpoint_every: int
    sample_every: int = 500      # image grids every N steps (and always at the end); 0 = only at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True            # bf16 autocast, CUDA only
    compile: bool = False        # torch.compile, CUDA only
    deterministic: bool = False  # CUDA: deterministic kernels (slower), so a resumed run is bit-exact; off: TF32
                                 # matmuls and cuDNN autotuning. CPU runs are deterministic either way.
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _check_base(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be >= 0, got {self.sample_every}")
        return self


# -----------------------------------------------------------------------------
# exceptions, signals, helpers

class Diverged(Exception):
    """Raised when a loss becomes NaN/inf; main() exits with EXIT_DIVERGED."""


class Interrupted(Exception):
    """Raised by a training loop after it saved a checkpoint because SIGTERM arrived."""


_STOP = {"requested": False}


def _on_sigterm(signum, frame):
    _STOP["requested"] = True


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    """The global random streams; on CUDA, the one of the device the run trains on (not every visible GPU)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device):
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):      # written by older code: every visible GPU's stream
        cuda = cuda[0] if len(cuda) == 1 else cuda
    if cuda is not None and device.type != "cuda":
        raise RuntimeError("the checkpoint was written by a run on CUDA and this run is on the CPU: its random "
                           "streams cannot be restored. Resume it where a GPU is visible (device: cuda), or start "
                           "the arm run over")
    if isinstance(cuda, (list, tuple)):
        raise RuntimeError(f"the checkpoint holds the random streams of {len(cuda)} GPUs; a run trains on one: "
                           f"resume it with CUDA_VISIBLE_DEVICES naming the one GPU it ran on")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """Deterministic kernels when asked (cuBLAS needs its workspace set before its first call); otherwise, on
    CUDA, TF32 matmuls and convolutions and cuDNN autotuning for the fixed shapes of a training step."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write_fn):
    """write_fn(f) writes into a temp file beside `path`; then flush, fsync, rename, fsync dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _to_jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_jsonable(x) for k, x in v.items()}
    return str(v)


# What a checkpoint's numpy RNG state (np.random.get_state(): a uint32 array) needs to unpickle beyond
# torch.load(weights_only=True)'s tensors and plain containers: constructors of plain arrays, nothing that runs code.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray     # numpy 2 / numpy 1
NUMPY_RNG_STATE = [_multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_weights_only(path, map_location="cpu") -> dict:
    """torch.load of a checkpoint or artifact without arbitrary unpickling (a file that came from another
    machine cannot run code here): tensors, plain containers and NUMPY_RNG_STATE only."""
    try:
        with torch.serialization.safe_globals(NUMPY_RNG_STATE):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RuntimeError(f"{path}: refused: it holds more than tensors, plain containers and numpy's RNG state "
                           f"({str(exc).splitlines()[0]})") from None


def load_artifact(out_dir, map_location="cpu") -> dict:
    """Loads OUT/artifact.pt written by Run.save_artifact."""
    path = Path(out_dir) / "artifact.pt"
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    return load_weights_only(path, map_location)


def averaged_eval_steps(cfg) -> list[int]:
    """The steps whose evaluations a summary averages (cfg.eval_average of them, cfg.eval_average_every
    apart, 0 = steps // 20, ending at cfg.steps): late enough that the trend is small, spread enough
    that the mean is not one draw of an oscillating run."""
    every = cfg.eval_average_every or max(1, cfg.steps // 20)
    return sorted(s for s in (cfg.steps - i * every for i in range(cfg.eval_average)) if s > 0)


def average_evaluations(recent: list[dict]) -> dict:
    """The key-wise mean of evaluations {"step": s, **metrics} (the keys all of them have), and the
    steps they were taken at."""
    keys = [k for k in recent[0] if k != "step" and all(k in r for r in recent)]
    out = {k: sum(float(r[k]) for r in recent) / len(recent) for k in keys}
    out["eval_steps_averaged"] = [r["step"] for r in recent]
    return out


# -----------------------------------------------------------------------------
# the Run: everything a training loop needs to talk to the outside world

class Run:
    def __init__(self, cfg: TrainerConfig, out_dir):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        (self.out / "samples").mkdir(exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        self.last_step = 0
        self.summary_written = False
        self._t0 = time.time()
        self._prior_wall = 0.0  # wall time spent by earlier attempts, restored on resume
        self._metrics_file = None

        want = getattr(cfg, "device", "auto")
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        self.device = torch.device("cuda" if want in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        self.use_bf16 = bool(getattr(cfg, "bf16", False)) and self.device.type == "cuda"
        configure_kernels(self.device, bool(getattr(cfg, "deterministic", False)))

        self._prev_handler = None
        try:  # only possible in the main thread; elsewhere (tests, threads) the flag just never flips
            self._prev_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:
            pass

    # --- device helpers
    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def maybe_compile(self, model):
        if getattr(self.cfg, "compile", False) and self.device.type == "cuda":
            return torch.compile(model)
        return model

    @property
    def stop_requested(self) -> bool:
        return _STOP["requested"]

    def stop(self, step: int, state: dict):
        """Called by a training loop when stop_requested: checkpoint, then unwind to main (exit 143)."""
        self.save_checkpoint(step, state)
        raise Interrupted(f"SIGTERM received, checkpoint saved at step {step}")

    @property
    def wall_time_s(self) -> float:
        return self._prior_wall + (time.time() - self._t0)

    # --- metrics
    def log(self, step: int, **scalars):
        row = {"step": int(step), "time": time.time()}
        row.update({k: _to_jsonable(v) for k, v in scalars.items()})
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a")
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        self.last_step = max(self.last_step, int(step))
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items() if k not in ("step", "time"))
        print(f"step {step} {shown}", flush=True)

    def check_finite(self, step: int, **losses):
        vals = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()}
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            self.log(step, **vals)
            raise Diverged(f"non-finite {', '.join(bad)} at step {step}")

    def _close_metrics(self):
        if self._metrics_file is not None:
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())
            self._metrics_file.close()
            self._metrics_file = None

    # --- checkpoints
    def save_checkpoint(self, step: int, state: dict):
        if self._metrics_file is not None:  # metrics up to `step` must be durable before the checkpoint
            self._metrics_file.flush()
            os.fsync(self._metrics_file.fileno())
        payload = dict(state)
        payload["step"] = int(step)
        payload["_rng"] = _rng_state(self.device)
        payload["_wall_time_s"] = self.wall_time_s
        atomic_write_bytes(self.ckpt_path, lambda f: torch.save(payload, f))

    def resume(self) -> dict | None:
        """Loads checkpoints/last.pt if present (restoring RNG states) and truncates metrics.jsonl to the
        rows with step <= checkpoint step, so the resumed run continues the same curve. Without a
        checkpoint, stale metrics from an attempt that died before its first checkpoint are dropped."""
        self._close_metrics()
        if not self.ckpt_path.exists():
            self._truncate_metrics(-1)
            return None
        state = load_weights_only(self.ckpt_path)
        _set_rng_state(state.pop("_rng"), self.device)
        self._prior_wall = float(state.pop("_wall_time_s", 0.0))
        self._t0 = time.time()
        self._truncate_metrics(state["step"])
        self.last_step = state["step"]
        print(f"resumed from {self.ckpt_path} at step {state['step']}", flush=True)
        return state

    def _truncate_metrics(self, max_step: int):
        if not self.metrics_path.exists():
            return
        keep = []
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn last line of a killed writer
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= max_step:
                    keep.append(json.dumps(row) + "\n")
        atomic_write_bytes(self.metrics_path, lambda f: f.write("".join(keep).encode()))

    # --- outputs
    def save_grid(self, name: str, images, nrow: int | None = None):
        """images: NCHW, float in [-1, 1] or uint8. Writes OUT/samples/<name>.png."""
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu() if images.dtype != torch.uint8 else images.cpu()
            images = images.numpy()
        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = np.clip((images.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        if images.ndim == 3:
            images = images[:, None]
        if images.shape[1] == 1:
            images = np.repeat(images, 3, axis=1)
        n, c, h, w = images.shape
        nrow = nrow or max(1, math.ceil(math.sqrt(n)))
        ncol = math.ceil(n / nrow)
        pad = 2
        grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
        for i in range(n):
            r, col = divmod(i, nrow)
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[y:y + h, x:x + w] = images[i, :3].transpose(1, 2, 0)
        img = Image.fromarray(grid)
        scale = max(1, 64 // max(h, w))  # make tiny images visible
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        path = self.out / "samples" / f"{name}.png"
        atomic_write_bytes(path, lambda f: img.save(f, format="PNG"))

    def write_summary(self, summary: dict):
        out = {"steps": self.last_step, "wall_time_s": round(self.wall_time_s, 3), "device": str(self.device)}
        out.update(summary)
        data = json.dumps(_to_jsonable(out), indent=2).encode()
        atomic_write_bytes(self.out / "summary.json", lambda f: f.write(data))
        self.summary_written = True

    def save_artifact(self, obj: dict):
        atomic_write_bytes(self.out / "artifact.pt", lambda f: torch.save(obj, f))

    def upstream(self, name: str, config: BaseModel, given_dir: str | None, train_fn) -> Path:
        """The folder of an upstream run's artifact.pt: `given_dir` when the orchestrator trained it,
        else a run of `train_fn(config, run)` into OUT/upstream/<name>, so this trainer also works alone."""
        if given_dir is not None:
            folder = Path(given_dir)
            if not (folder / "artifact.pt").exists():
                raise BadConfig(f"{name}_dir: no artifact.pt in {folder}")
            trained_with = load_artifact(folder).get("config")
            if trained_with != config.model_dump():
                print(f"warning: the {name} in {folder} was trained with a config that differs from `{name}`; "
                      "using the artifact's", file=sys.stderr, flush=True)
            return folder
        folder = self.out / "upstream" / name
        if not ((folder / "artifact.pt").exists() and (folder / "summary.json").exists()):
            print(f"training the {name} into {folder}", flush=True)
            upstream_run = Run(config, folder)
            try:
                train_fn(config, upstream_run)
            finally:
                upstream_run.close()
        return folder

    def close(self):
        """Flushes metrics and gives SIGTERM back to whoever handled it before this Run."""
        self._close_metrics()
        if self._prev_handler is not None:
            try:
                signal.signal(signal.SIGTERM, self._prev_handler)
            except ValueError:
                pass
            self._prev_handler = None


# -----------------------------------------------------------------------------
# config loading and the entry point

class BadConfig(Exception):
    """A config that validates field by field but cannot run (e.g. a resolution the model cannot take)."""


def _field_paths(cls, prefix="") -> list[str]:
    paths = []
    for name, field in cls.model_fields.items():
        paths.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _field_paths(ann, prefix + name + ".")
    return paths


def _expand_dotted(raw: dict) -> dict:
    """{"model.dim": 64} -> {"model": {"dim": 64}} (nested dicts merge)."""
    out: dict = {}
    for key, val in raw.items():
        if isinstance(val, dict):
            val = _expand_dotted(val)
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BadConfig(f"{key}: conflicts with a non-mapping value for '{p}'")
        if isinstance(val, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(val)
        else:
            node[parts[-1]] = val
    return out


def format_validation_error(err: ValidationError, config_cls) -> str:
    valid = _field_paths(config_cls)
    msgs = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, valid, n=3, cutoff=0.5)
            hint = f" (closest valid: {', '.join(close)})" if close else ""
            msgs.append(f"{loc}: unknown key{hint}")
        elif e["type"] == "missing":
            msgs.append(f"{loc}: required field missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            msgs.append(f"{loc}: {msg}{shown}")
    return "; ".join(msgs)


def load_config(config_cls, path: str | None, overrides: dict | None = None):
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists() or p.is_dir():
            raise BadConfig(f"config file not found: {path}")
        try:
            raw = json.loads(p.read_text() or "{}")
        except json.JSONDecodeError as e:
            raise BadConfig(f"config file {path} is not valid JSON: {e}")
        if not isinstance(raw, dict):
            raise BadConfig(f"config file {path} must hold a JSON object")
    if overrides:
        raw = {**raw, **overrides}
    raw = _expand_dotted(raw)
    try:
        return config_cls.model_validate(raw)
    except ValidationError as e:
        raise BadConfig(format_validation_error(e, config_cls))


def main(train_fn, config_cls, argv=None) -> int:
    parser = argparse.ArgumentParser(description=f"trainer ({config_cls.__module__})")
    parser.add_argument("--config", default=None, help="JSON config; omitted keys take the Config defaults")
    parser.add_argument("--out", required=True, help="output directory (metrics, checkpoints, samples)")
    args = parser.parse_args(argv)

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))

    try:
        cfg = load_config(config_cls, args.config)
    except BadConfig as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    _STOP["requested"] = False
    run = Run(cfg, args.out)
    if os.environ.get("ARMATURE_SYNC_DEBUG") and run.device.type == "cuda":
        # every host synchronisation prints a warning on stderr (tests/bench/bench_gpu.py counts them)
        import warnings
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    try:
        train_fn(cfg, run)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Diverged as e:
        print(f"diverged: {e}", file=sys.stderr)
        run.write_summary({"diverged": True, "reason": str(e)})
        return EXIT_DIVERGED
    except BadConfig as e:  # raised by trainers for problems only visible at run time (e.g. a bad upstream)
        print(f"error: invalid config: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        run.close()
    if run.stop_requested and not run.summary_written:
        return EXIT_INTERRUPTED
    return EXIT_OK
