"""The live progress view: one line per arm run (arm, seed, state, step/total, primary metric, ETA).

On a terminal it is a table redrawn in place (rich.live); elsewhere (CI, a log
file) it prints a line whenever an arm run changes state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass
class ArmLine:
    arm: str
    seed: int
    total: int | None
    state: str = "pending"
    step: int | None = None
    metric: float | None = None
    reason: str | None = None
    hardware: str | None = None
    started: float | None = None       # (time, step) at the first step seen by this view, for the ETA
    started_step: int = 0
    steps_per_s: float | None = None


class Progress:
    def __init__(self, metric: str, console: Console | None = None):
        self.metric = metric
        self.console = console or Console()
        self.lines: dict[int, ArmLine] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self.interactive = self.console.is_terminal

    def add(self, arm_run_id: int, arm: str, seed: int, total: int | None, state: str = "pending",
            step: int | None = None) -> None:
        self.lines[arm_run_id] = ArmLine(arm, seed, total, state, step)

    def start(self) -> None:
        if self.interactive:
            self._live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False,
                              get_renderable=self._table)
            self._live.start()

    def stop(self) -> None:
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
                if row.get(self.metric) is not None:
                    line.metric = row[self.metric]
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

    def _print_change(self, line: ArmLine) -> None:
        step = f" step {line.step}/{line.total}" if line.step is not None else ""
        why = f" ({line.reason})" if line.reason else ""
        print(f"[{time.strftime('%H:%M:%S')}] {line.arm} seed {line.seed}: {line.state}{step}{why}", flush=True)

    def _table(self) -> Table:
        table = Table(title="armature", expand=False)
        for column in ("arm", "seed", "state", "step", self.metric, "ETA"):
            table.add_column(column, justify="right" if column in ("seed", "step", "ETA") else "left")
        with self._lock:
            for line in self.lines.values():
                step = f"{line.step or 0}/{line.total or '?'}"
                metric = f"{line.metric:.4g}" if isinstance(line.metric, (int, float)) else ""
                table.add_row(line.arm, str(line.seed), _styled(line.state), step, metric, _eta(line))
        return table


def _eta(line: ArmLine) -> str:
    if line.state != "running" or not line.steps_per_s or not line.total or line.step is None:
        return ""
    seconds = max(0.0, (line.total - line.step) / line.steps_per_s)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


STATE_STYLE = {"succeeded": "green", "running": "cyan", "failed": "red", "diverged": "magenta",
               "cancelled": "yellow", "pending": "dim"}


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state
