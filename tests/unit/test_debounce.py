"""Every branch of the debounce table (SPEC, Liveness)."""

from __future__ import annotations

from a2ad.liveness import Debounce, Observation

RUNNING, NOT_RUNNING, UNKNOWN = Observation.RUNNING, Observation.NOT_RUNNING, Observation.UNKNOWN


def debounce() -> Debounce:
    return Debounce(recent=15, window=30)


def test_recent_sign_of_life_needs_a_second_observation_within_the_window() -> None:
    d = debounce()
    assert not d.observe("w", NOT_RUNNING, now=100, last_sign_of_life=95)
    assert d.observe("w", NOT_RUNNING, now=110, last_sign_of_life=95)
    assert len(d) == 0  # declared: nothing left to remember


def test_an_observation_outside_the_window_starts_over() -> None:
    d = debounce()
    assert not d.observe("w", NOT_RUNNING, now=100, last_sign_of_life=95)
    assert not d.observe("w", NOT_RUNNING, now=131, last_sign_of_life=125)
    assert d.observe("w", NOT_RUNNING, now=140, last_sign_of_life=125)


def test_no_recent_sign_of_life_is_dead_at_once() -> None:
    d = debounce()
    assert d.observe("w", NOT_RUNNING, now=100, last_sign_of_life=80)
    assert d.observe("v", NOT_RUNNING, now=100, last_sign_of_life=None)


def test_unknown_counts_as_alive() -> None:
    d = debounce()
    assert not d.observe("w", UNKNOWN, now=100, last_sign_of_life=None)
    assert not d.observe("w", UNKNOWN, now=101, last_sign_of_life=None)


def test_running_resets_the_count() -> None:
    d = debounce()
    assert not d.observe("w", NOT_RUNNING, now=100, last_sign_of_life=95)
    assert not d.observe("w", RUNNING, now=101, last_sign_of_life=101)
    assert not d.observe("w", NOT_RUNNING, now=102, last_sign_of_life=101)  # first again
    assert d.observe("w", NOT_RUNNING, now=103, last_sign_of_life=101)


def test_memory_of_recovered_or_removed_workspaces_is_dropped() -> None:
    d = debounce()
    d.observe("w", NOT_RUNNING, now=100, last_sign_of_life=95)
    d.observe("v", NOT_RUNNING, now=100, last_sign_of_life=95)
    assert len(d) == 2
    d.observe("w", RUNNING, now=101, last_sign_of_life=101)  # recovered
    d.forget("v")  # removed
    assert len(d) == 0


def test_workspaces_are_counted_apart() -> None:
    d = debounce()
    assert not d.observe("w", NOT_RUNNING, now=100, last_sign_of_life=95)
    assert not d.observe("v", NOT_RUNNING, now=101, last_sign_of_life=95)
    assert d.observe("w", NOT_RUNNING, now=102, last_sign_of_life=95)
