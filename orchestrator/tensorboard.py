"""TensorBoard event files written by the driver as an arm run's metrics arrive.

The scheduler receives every metrics row of every attempt, whatever the backend (local, Ray cluster,
rented instance), so the curves are written here rather than by the trainers: one TensorBoard run per
arm and seed, `runs/<run_id>/tensorboard/<arm>/seed<k>`, holding

  - every numeric key of the metrics rows as a scalar against the step,
  - the sample grids under the arm run's samples/ as images: `<name>_stepNNNNNN.png` at that step as
    they appear, the final `<name>.png` at the last step when the arm run succeeds,
  - the HParams plugin's session start (the arm, the seed and the value of every config key some arm
    changes) and end (its state), with the summary's metrics as `final/<metric>` scalars.

TensorBoard draws a curve whose steps go backwards (a resumed attempt repeating steps after its last
checkpoint) as a zig-zag, so only steps beyond the last one written are written, per tag. What was
written is read back from the event files when a run is opened again, so a resumed study (a new
driver process) does not duplicate points either.

Writing is best effort: a full disk or an unwritable folder turns this log off with one warning
and never stops the study.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import threading
import time
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata as hparams_metadata, plugin_data_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from orchestrator.spec import flatten

TENSORBOARD_DIR = "tensorboard"
STEP_IMAGE = re.compile(r"^(?P<name>.+)_step(?P<step>\d+)\.png$")
NOT_SCALARS = {"step", "time"}
END_STATUS = {"succeeded": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE,
              "diverged": api_pb2.STATUS_FAILURE, "cancelled": api_pb2.STATUS_UNKNOWN}


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def run_logdir(run_dir: Path, arm: str, seed: int) -> Path:
    """The TensorBoard run of one arm and seed."""
    return tensorboard_dir(run_dir) / arm / f"seed{seed}"


def changed_keys(study) -> list[str]:
    """The config keys some arm or the grid of the study sets (the HParams columns), in first-seen order."""
    return list(dict.fromkeys([key for arm in study.arms for key in flatten(arm.set)] + list(study.grid)))


def hparams_of(arm_run: dict, keys: list[str]) -> dict:
    """The arm, the seed and each changed key's value in this arm run's full config (as TensorBoard takes it:
    a number, a bool or a string)."""
    config = flatten(json.loads(arm_run.get("config_json") or "{}"))
    values = {"arm": arm_run["arm"], "seed": int(arm_run["seed"])}
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        values[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    return values


def _scalar(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class _RunWriter:
    """One TensorBoard run: an event file writer and the last step written per tag."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.last_step: dict[str, int] = {}
        self.has_session_start = False
        if logdir.is_dir():
            self._read_back()
        logdir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(logdir))

    def _read_back(self) -> None:
        for path in sorted(self.logdir.glob("events.out.tfevents.*")):
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
                        self.has_session_start = True
                    elif event.step > self.last_step.get(value.tag, -1):
                        self.last_step[value.tag] = event.step

    def is_new(self, tag: str, step: int) -> bool:
        return step > self.last_step.get(tag, -1)

    def write(self, step: int, values: list[summary_pb2.Summary.Value], wall_time: float | None = None) -> None:
        fresh = [v for v in values if v.tag.startswith("_hparams_/") or self.is_new(v.tag, step)]
        if not fresh:
            return
        event = event_pb2.Event(wall_time=wall_time or time.time(), step=step, summary=summary_pb2.Summary(value=fresh))
        self.writer.add_event(event)
        for value in fresh:
            if not value.tag.startswith("_hparams_/"):
                self.last_step[value.tag] = step

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _image_value(tag: str, png: Path) -> summary_pb2.Summary.Value | None:
    try:
        encoded = png.read_bytes()
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
            channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(image.mode)
            image.verify()
    except (OSError, ValueError, SyntaxError):    # PIL's verify() raises SyntaxError on a damaged PNG
        return None     # half-copied or not a PNG: the next look takes it
    if channels is None:
        return None
    return summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=encoded))


class TensorBoardLog:
    """The TensorBoard runs of one study, fed by the scheduler (from the attempts' threads)."""

    def __init__(self, run_dir: Path, hparam_keys: list[str]):
        self.run_dir = Path(run_dir)
        self.hparam_keys = hparam_keys
        self.writers: dict[int, _RunWriter] = {}     # arm_run id -> its TensorBoard run
        self.lock = threading.Lock()
        self.broken: str | None = None               # why writing stopped

    def _writer(self, arm_run: dict) -> _RunWriter:
        writer = self.writers.get(arm_run["id"])
        if writer is None:
            writer = self.writers[arm_run["id"]] = _RunWriter(run_logdir(self.run_dir, arm_run["arm"],
                                                                         arm_run["seed"]))
            if not writer.has_session_start:
                start = hparams_pb(hparams_of(arm_run, self.hparam_keys), trial_id=f"{arm_run['arm']}/seed"
                                   f"{arm_run['seed']}")
                writer.write(0, list(start.value))
                writer.has_session_start = True
        return writer

    def _guarded(self, arm_run: dict, write) -> None:
        if self.broken or arm_run.get("kind", "arm") != "arm":   # upstream runs are not arms of the study
            return
        with self.lock:
            try:
                writer = self._writer(arm_run)
                write(writer)
                writer.flush()
            except (OSError, ValueError) as exc:
                self.broken = f"{type(exc).__name__}: {exc}"
                print(f"armature: TensorBoard logging stopped ({self.broken}); the study goes on",
                      file=sys.stderr)

    def metrics(self, arm_run: dict, rows: list[dict]) -> None:
        """New metrics rows of an arm run, and the step-stamped sample grids it has written so far."""
        def write(writer: _RunWriter) -> None:
            for row in rows:
                if not isinstance(row.get("step"), int):
                    continue
                values = [summary_pb2.Summary.Value(tag=key, simple_value=number) for key, value in row.items()
                          if key not in NOT_SCALARS and (number := _scalar(value)) is not None]
                writer.write(row["step"], values, _scalar(row.get("time")))
            self._step_images(writer, Path(arm_run["out_dir"]))
        self._guarded(arm_run, write)

    def ended(self, arm_run: dict, state: str, summary: dict | None, last_step: int | None) -> None:
        """An attempt ended with the arm run in `state`: its last sample grids, and on a final state the final
        metrics and the HParams session end."""
        def write(writer: _RunWriter) -> None:
            self._step_images(writer, Path(arm_run["out_dir"]))
            step = last_step if last_step is not None else max(writer.last_step.values(), default=0)
            if state == "succeeded":
                samples = Path(arm_run["out_dir"]) / "samples"
                finals = [_image_value(f"samples/{png.stem}", png) for png in sorted(samples.glob("*.png"))
                          if not STEP_IMAGE.match(png.name)]
                writer.write(step, [v for v in finals if v is not None])
                writer.write(step, [summary_pb2.Summary.Value(tag=f"final/{key}", simple_value=number)
                                    for key, value in (summary or {}).items()
                                    if key not in ("steps", "wall_time_s") and (number := _scalar(value)) is not None])
            if state in END_STATUS:
                end = plugin_data_pb2.SessionEndInfo(status=END_STATUS[state], end_time_secs=time.time())
                writer.write(step, [_hparams_value(hparams_metadata.SESSION_END_INFO_TAG,
                                                   plugin_data_pb2.HParamsPluginData(session_end_info=end))])
        self._guarded(arm_run, write)

    def _step_images(self, writer: _RunWriter, out_dir: Path) -> None:
        for png in sorted((out_dir / "samples").glob("*_step*.png")):
            match = STEP_IMAGE.match(png.name)
            if match is None:
                continue
            tag, step = f"samples/{match['name']}", int(match["step"])
            if writer.is_new(tag, step) and (value := _image_value(tag, png)) is not None:
                writer.write(step, [value])

    def close(self) -> None:
        with self.lock:
            for writer in self.writers.values():
                try:
                    writer.close()
                except OSError:
                    pass
            self.writers.clear()


def _hparams_value(tag: str, content: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary.Value:
    return summary_pb2.Summary.Value(tag=tag, metadata=hparams_metadata.create_summary_metadata(content),
                                     tensor=hparams_metadata.NULL_TENSOR)
