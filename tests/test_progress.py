"""Long work reports progress in logs as well as on a terminal (graphopt/progress.py)."""

import logging
import re

import pytest

from graphopt.progress import Progress, track


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "graphopt.progress"]


def test_lines_say_what_is_done_the_elapsed_time_and_what_remains(caplog):
    caplog.set_level(logging.INFO, logger="graphopt.progress")
    with Progress("calibrate", total=4, unit="batch", bar=False, every=0.0) as p:
        for _ in range(4):
            p.update(loss="0.5")
    lines = _lines(caplog)
    assert len(lines) == 5, lines
    assert re.fullmatch(r"calibrate: 1/4 batches \(25%\), \d+ s elapsed, about \d+ s left, loss=0\.5", lines[0])
    assert lines[3].startswith("calibrate: 4/4 batches (100%)")
    assert re.fullmatch(r"calibrate: 4 batches in \d+ s", lines[-1])


def test_short_work_writes_nothing(caplog):
    caplog.set_level(logging.INFO, logger="graphopt.progress")
    assert list(track(range(3), "quick", bar=False, every=60.0)) == [0, 1, 2]
    assert _lines(caplog) == []


def test_track_counts_what_it_yields_and_work_of_unknown_length(caplog):
    caplog.set_level(logging.INFO, logger="graphopt.progress")
    assert list(track(iter([1, 2]), "stream", unit="block", bar=False, every=0.0)) == [1, 2]
    lines = _lines(caplog)
    assert lines[:2] == [lines[0], lines[1]] and lines[0].startswith("stream: 1 block,")
    assert lines[1].startswith("stream: 2 blocks,") and "left" not in lines[1]
