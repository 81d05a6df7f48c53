"""The live progress view: the run id, time elapsed, an overall progress bar with the study's ETA, and one
line per arm run (arm, seed, state, step/total, loss, primary metric, steps/s, ETA).

On a terminal it is redrawn in place (rich.live); elsewhere (CI, a log file) it prints a line whenever an
arm run changes state, and a heartbeat line every `heartbeat_s` seconds so that a long arm is not silence.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.ledger import FINAL_STATES

HEARTBEAT_S = 60.0              # without a terminal: a summary line this often


@dataclass
class ArmLine:
    arm: str
    seed: int
    total: int | None
    state: str = "pending"
    step: int | None = None
    metric: float | None = None
    loss: float | None = None
    reason: str | None = None
    hardware: str | None = None
    started: float | None = None       # (time, step) at the first step seen by this view, for the ETA
    started_step: int = 0
    steps_per_s: float | None = None


class Progress:
    def __init__(self, metric: str, console: Console | None = None, run_id: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S):
        self.metric = metric
        self.console = console or Console()
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.lines: dict[int, ArmLine] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._heartbeat: threading.Thread | None = None
        self._stopped = threading.Event()
        self._began = time.time()
        self.interactive = self.console.is_terminal

    def add(self, arm_run_id: int, arm: str, seed: int, total: int | None, state: str = "pending",
            step: int | None = None, metrics: dict | None = None) -> None:
        """An arm run to show; `metrics` are its last ones (an arm finished before a resume keeps its values)."""
        line = ArmLine(arm, seed, total, state, step)
        _take_metrics(line, metrics or {}, self.metric)
        self.lines[arm_run_id] = line

    def start(self) -> None:
        self._began = time.time()
        self._stopped.clear()
        if self.interactive:
            # get_renderable draws each frame afresh; Live draws nothing before its first refresh
            self._live = Live(console=self.console, refresh_per_second=2, transient=False,
                              get_renderable=self._view)
            self._live.start()
        elif self.heartbeat_s > 0:
            self._heartbeat = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._heartbeat.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def update(self, arm_run_id: int, state: str | None = None, rows: list | None = None,
               reason: str | None = None, hardware: str | None = None) -> None:
        with self._lock:
            line = self.lines.get(arm_run_id)
            if line is None:
                return
            if hardware:
                line.hardware = hardware
            for row in rows or ():
                line.step = int(row["step"])
                _take_metrics(line, row, self.metric)
                if line.started is None:
                    line.started, line.started_step = time.time(), line.step
                elif time.time() > line.started and line.step > line.started_step:
                    line.steps_per_s = (line.step - line.started_step) / (time.time() - line.started)
            if state and state != line.state:
                line.state = state
                line.reason = reason
                if state == "running":
                    line.started = None
                if not self.interactive:
                    self._print_change(line)

    def note(self, text: str) -> None:
        """A line about the whole run (above the live view on a terminal)."""
        self._say(text)

    # ---- text for logs -------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}", soft_wrap=True, markup=False, highlight=False)

    def _print_change(self, line: ArmLine) -> None:
        step = f" step {line.step}/{line.total}" if line.step is not None else ""
        why = f" ({line.reason})" if line.reason else ""
        self._say(f"{line.arm} seed {line.seed}: {line.state}{step}{why}")

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_s):
            self._say(self.summary())

    def summary(self) -> str:
        """One line about the whole run: elapsed, arm runs done and running, steps, ETA."""
        with self._lock:
            lines = list(self.lines.values())
        done = sum(line.state in FINAL_STATES for line in lines)
        running = sum(line.state == "running" for line in lines)
        steps, total = _steps(lines)
        eta = _study_eta(lines)
        parts = [f"{self.run_id or 'run'}: elapsed {_duration(time.time() - self._began)}",
                 f"{done}/{len(lines)} arm runs done, {running} running"]
        if total:
            parts.append(f"steps {steps}/{total} ({steps / total:.0%})")
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return ", ".join(parts)

    # ---- the terminal view ------------------------------------------------------------------------

    def _view(self) -> Group:
        with self._lock:
            lines = list(self.lines.values())
        steps, total = _steps(lines)
        bar = Table.grid()          # a line of its own (a bare ProgressBar ends no line)
        bar.add_row(ProgressBar(total=total or 1, completed=steps if total else 0, width=40))
        return Group(Text(self.summary(), style="bold"), bar, self._table(lines))

    def _table(self, lines: list[ArmLine] | None = None) -> Table:
        table = Table(expand=False)
        for column in ("arm", "seed", "state", "step", "loss", self.metric, "steps/s", "ETA"):
            table.add_column(column, justify="left" if column in ("arm", "state") else "right")
        with self._lock:
            for line in lines if lines is not None else self.lines.values():
                table.add_row(line.arm, str(line.seed), _styled(line.state), f"{line.step or 0}/{line.total or '?'}",
                              _number(line.loss), _number(line.metric),
                              f"{line.steps_per_s:.3g}" if line.steps_per_s and line.state == "running" else "",
                              _eta(line))
        return table


def _take_metrics(line: ArmLine, values: dict, metric: str) -> None:
    if isinstance(values.get(metric), (int, float)):
        line.metric = values[metric]
    if isinstance(values.get("loss"), (int, float)):
        line.loss = values["loss"]


def _number(value: float | None) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


def _steps(lines: list[ArmLine]) -> tuple[int, int]:
    """(steps done, steps in all) over the arm runs whose length is known; a finished arm counts as whole."""
    done = total = 0
    for line in lines:
        if line.total:
            total += line.total
            done += line.total if line.state in FINAL_STATES else min(line.step or 0, line.total)
    return done, total


def _study_eta(lines: list[ArmLine]) -> float | None:
    """Seconds until every arm run is done, at the running arms' combined speed (None before it is known)."""
    rate = sum(line.steps_per_s for line in lines if line.state == "running" and line.steps_per_s)
    done, total = _steps(lines)
    if not rate or not total:
        return None
    return max(0.0, (total - done) / rate)


def _eta(line: ArmLine) -> str:
    if line.state != "running" or not line.steps_per_s or not line.total or line.step is None:
        return ""
    return _duration(max(0.0, (line.total - line.step) / line.steps_per_s))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


STATE_STYLE = {"succeeded": "green", "running": "cyan", "failed": "red", "diverged": "magenta",
               "cancelled": "yellow", "pending": "dim"}


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state
