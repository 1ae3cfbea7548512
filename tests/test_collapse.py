"""The collapse detector's state machine on scripted metric sequences."""

from __future__ import annotations

import pytest

from pgan.metrics.collapse import DetectorState, Thresholds, in_grace_window, severity, update

T = Thresholds()  # excess_pair 0.1 / 0.25, vendi 0.6 / 0.4, std 0.3, hysteresis 0.8


def m(excess: float = 0.0, se: float = 0.0, vendi: float = 1.0, std: float = 1.0) -> dict:
    """One evaluation's metrics."""
    return {"excess_pair": excess, "excess_pair_se": se, "vendi_ratio": vendi, "std_ratio": std}


HEALTHY, WARN, COLLAPSED = m(), m(excess=0.15), m(excess=0.5)


def run(sequence, patience: int = 2, recover_patience: int = 2, grace=None) -> list[str]:
    """States after each evaluation of `sequence` (grace: indices evaluated in a grace window)."""
    state, states = DetectorState(), []
    for i, metrics in enumerate(sequence):
        state = update(state, metrics, T, patience, recover_patience, in_grace=i in (grace or ()))
        states.append(state.state)
    return states


@pytest.mark.parametrize(
    ("metrics", "level"),
    [
        (HEALTHY, 0),
        (m(excess=0.15), 1),
        (m(excess=0.15, se=0.05), 0),  # within two standard errors of the warning threshold
        (m(excess=0.3), 2),
        (m(vendi=0.5), 1),
        (m(vendi=0.3), 2),
        (m(std=0.1), 2),
        (m(excess=0.15, vendi=0.3), 2),  # the worst test wins
    ],
)
def test_severity(metrics: dict, level: int) -> None:
    assert severity(metrics, T) == level


def test_hysteresis_thresholds_are_stricter() -> None:
    assert severity(m(excess=0.09), T) == 0 and severity(m(excess=0.09), T, recovering=True) == 1
    assert severity(m(vendi=0.7), T) == 0 and severity(m(vendi=0.7), T, recovering=True) == 1


def test_patience_needs_consecutive_evaluations() -> None:
    assert run([COLLAPSED, HEALTHY, COLLAPSED, HEALTHY]) == ["ok"] * 4  # never two in a row
    assert run([HEALTHY, COLLAPSED, COLLAPSED]) == ["ok", "ok", "collapsed"]
    assert run([COLLAPSED] * 3, patience=3) == ["ok", "ok", "collapsed"]
    assert run([COLLAPSED], patience=1) == ["collapsed"]


def test_mixed_levels_rise_to_the_mildest_of_the_streak() -> None:
    assert run([WARN, COLLAPSED, COLLAPSED]) == ["ok", "warning", "collapsed"]
    assert run([COLLAPSED, WARN]) == ["ok", "warning"]


def test_recovery_needs_clear_evaluations_with_hysteresis() -> None:
    just_below = m(excess=0.09)  # below the warning threshold, not below it x 0.8
    states = run([WARN, WARN, just_below, just_below, just_below, HEALTHY, HEALTHY])
    assert states == ["ok", "warning", "warning", "warning", "warning", "warning", "ok"]
    # Down one level once the last two are clear of collapse, to ok once they are clear of a warning too.
    assert run([COLLAPSED, COLLAPSED, HEALTHY, WARN, HEALTHY, HEALTHY]) == [
        "ok",
        "collapsed",
        "collapsed",
        "warning",
        "warning",
        "ok",
    ]
    assert run([COLLAPSED, COLLAPSED, WARN, WARN]) == ["ok", "collapsed", "collapsed", "warning"]
    assert run([COLLAPSED, COLLAPSED, HEALTHY], recover_patience=1)[-1] == "ok"


def test_grace_window_neither_moves_the_state_nor_counts() -> None:
    # Bad evaluations inside grace are ignored, and one before + one after grace is not a streak.
    assert run([COLLAPSED, COLLAPSED, COLLAPSED], grace={0, 1}) == ["ok", "ok", "ok"]
    assert run([COLLAPSED, COLLAPSED, COLLAPSED, COLLAPSED], grace={1}) == ["ok", "ok", "ok", "collapsed"]
    # A state reached before a grace window is held through it.
    assert run([COLLAPSED, COLLAPSED, HEALTHY, HEALTHY], grace={2, 3}) == ["ok", "collapsed", "collapsed", "collapsed"]


def test_update_returns_a_new_state_and_counts_evaluations() -> None:
    before = DetectorState()
    after = update(before, COLLAPSED, T, patience=1)
    assert before.state == "ok" and before.evaluations == 0
    assert after.state == "collapsed" and after.evaluations == 1
    assert DetectorState.from_dict(after.to_dict()) == after


@pytest.mark.parametrize(
    ("nimg", "fade_nimg", "grace"),
    [
        (0, 0, True),
        (255, 0, True),
        (256, 0, False),
        (300, 1000, True),  # first half of the fade-in
        (499, 1000, True),
        (500, 1000, False),
        (5000, 1000, False),
    ],
)
def test_grace_window(nimg: int, fade_nimg: int, grace: bool) -> None:
    assert in_grace_window(nimg, fade_nimg, grace_kimg=0.256, grace_fade_fraction=0.5) is grace


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hysteresis": 0.0},
        {"hysteresis": 1.5},
        {"excess_pair_warning": 0.3, "excess_pair_collapsed": 0.2},
        {"vendi_ratio_warning": 0.3, "vendi_ratio_collapsed": 0.4},
    ],
)
def test_inconsistent_thresholds_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Thresholds(**kwargs)


def test_patience_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="patience"):
        update(DetectorState(), HEALTHY, T, patience=0)
