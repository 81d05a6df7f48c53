"""Following a trainer's metrics.jsonl as it grows, and as a resumed trainer replaces it."""

import json
import os

from orchestrator.metrics_tail import JsonlTail


def _rows(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_only_complete_new_lines_are_returned(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    assert tail.read_new() == []
    path.write_text(_rows(10, 20) + '{"step": 30, "lo')
    assert [r["step"] for r in tail.read_new()] == [10, 20]
    with open(path, "a") as f:
        f.write('ss": 0.1}\n')
    assert [r["step"] for r in tail.read_new()] == [30]
    assert tail.last_step == 30


def test_a_replaced_file_is_read_from_its_start_even_when_it_is_as_long(tmp_path):
    # A resumed trainer atomically replaces metrics.jsonl with the rows up to its checkpoint and goes on
    # logging; by the next read the new file can be longer than the old read position.
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(10, 20, 30))
    tail = JsonlTail(path)
    assert [r["step"] for r in tail.read_new()] == [10, 20, 30]
    replacement = tmp_path / "metrics.jsonl.tmp"
    replacement.write_text(_rows(10, 20, 21, 22, 23, 24))
    os.replace(replacement, path)
    assert [r["step"] for r in tail.read_new()] == [10, 20, 21, 22, 23, 24]
