"""A pytest plugin of benchmarks/gpu_check.sh: every test's outcome as it happens, one JSON line
each, in the file named by $GPU_CHECK_PYTEST_LOG.

Why not junit XML: pytest writes that at the end, and a run cut by its time box never reaches the
end. Lines appended as tests finish survive the cut, so the report can still name every failure
and count what did not run. Works with and without pytest-xdist (the controller sees every
worker's reports; the collected ids come from the first worker that finished collecting).

    {"collected": [node ids]}                       once
    {"id": ..., "outcome": "passed|failed|skipped|error", "s": seconds, "first": "E ..."}
"""

from __future__ import annotations

import json
import os

import pytest

_LOG = os.environ.get("GPU_CHECK_PYTEST_LOG")
_seen_collection = False


def _write(record: dict) -> None:
    if not _LOG:
        return
    with open(_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def first_error_line(text: str) -> str:
    """The first 'E   ...' line of a failure's text (the assertion or exception), else its last
    non-empty line."""
    lines = [x.rstrip() for x in (text or "").splitlines() if x.strip()]
    err = next((x for x in lines if x.startswith("E ")), None)
    return (err or (lines[-1] if lines else ""))[:300]


def _collected(ids) -> None:
    global _seen_collection
    if not _seen_collection:
        _seen_collection = True
        _write({"collected": list(ids)})


def pytest_collection_finish(session):
    # a run without xdist (xdist workers collect too: the controller reports their ids below)
    if not _is_worker():
        _collected(item.nodeid for item in session.items)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown where xdist is not installed
def pytest_xdist_node_collection_finished(node, ids):
    _collected(ids)


def pytest_runtest_logreport(report):
    if _is_worker():  # the controller gets the same report and writes it
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if report.when == "setup" and outcome == "failed":
            outcome = "error"
    elif report.when == "teardown" and report.outcome == "failed":
        outcome = "error"
    else:
        return
    rec = {"id": report.nodeid, "outcome": outcome, "s": round(report.duration, 3)}
    if outcome in ("failed", "error"):
        rec["first"] = first_error_line(report.longreprtext)
    _write(rec)


def _is_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ
