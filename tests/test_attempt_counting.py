"""Which ended attempts use up `max_attempts` (scheduler.counted_failures): failures and lost machines always; a
preemption (an outbid, a preempted instance) only when the next attempt did not continue past where it began."""

from orchestrator.scheduler import counted_failures


def attempts(*ends: tuple[str, int | None]) -> list[dict]:
    return [{"n": n, "state": state, "start_step": start} for n, (state, start) in enumerate(ends, 1)]


def test_failed_and_lost_attempts_always_count():
    assert counted_failures(attempts(("failed", 0), ("lost", 100), ("failed", 200))) == 3


def test_a_preemption_continued_from_a_later_checkpoint_is_free():
    # outbid four times, each time the next attempt began further on: nothing lost but time
    assert counted_failures(attempts(("preempted", 1), ("preempted", 101), ("preempted", 201),
                                     ("preempted", 301))) == 1    # the last: nobody has continued it yet


def test_a_preemption_that_saved_nothing_counts():
    # the next attempt began where the preempted one did (no checkpoint in between), or never logged a step
    assert counted_failures(attempts(("preempted", 101), ("preempted", 101), ("preempted", None))) == 3
    assert counted_failures(attempts(("preempted", None), ("preempted", None))) == 2


def test_interrupts_pauses_and_watchdog_stops_never_count():
    assert counted_failures(attempts(("interrupted", 0), ("cancelled", 0), ("succeeded", 10))) == 0
    assert counted_failures(attempts(("interrupted", 0), ("failed", 0), ("preempted", 50), ("preempted", 90))) == 2
