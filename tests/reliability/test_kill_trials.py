"""The short kill trial: workers SIGKILLed at random moments under a stream of jobs.

`make test-reliability` runs the long one (tests/reliability/kill_trials.py, 1,000
kills); this runs 3, with default settings, and asserts the same outcome.
"""

from __future__ import annotations

from pathlib import Path

import harness
import pytest
from kill_trials import run_trials

pytestmark = pytest.mark.timeout(600)


def test_three_random_kills_lose_duplicate_and_change_nothing(tmp_path: Path) -> None:
    trial = run_trials(tmp_path, kills=3, workers=2, seed=7, say=lambda line: None)
    assert trial.jobs > 3 * 2
    assert trial.lost == [] and trial.duplicated == [] and trial.different == []
    assert trial.recovered >= 1  # a killed worker always holds a job: the queue is kept full
    assert trial.back_s and trial.percentile(0.95) <= 60
    section = "Kill trials (3 kills, default settings)"
    harness.record(section, "jobs", trial.jobs)
    harness.record(section, "lost / duplicated / different", "0 / 0 / 0")
    harness.record(
        section,
        "recovered / of which sent again by the reconciler",
        f"{trial.recovered} / {trial.resent}",
    )
    harness.record(
        section,
        "kill -> delivered again, p50 / p95 (s)",
        f"{trial.percentile(0.5):.1f} / {trial.percentile(0.95):.1f}",
    )
    harness.record(section, "minutes", round(trial.seconds / 60, 1))
