"""A workflow job's timing line (cellarena/timing.py), which benchmarks/time_dag.py adds up."""

from __future__ import annotations

import io
import json
import time

from cellarena.timing import PREFIX, T0_ENV, Clock


def test_process_start_is_when_the_process_was_launched():
    import subprocess
    import sys

    launched = time.time()
    out = subprocess.run([sys.executable, "-c", "from cellarena.timing import process_start; print(process_start())"],
                         capture_output=True, text=True, check=True).stdout
    assert launched - 0.05 < float(out) < launched + 0.5  # created right after Popen, to ~10 ms


def test_the_line_splits_start_up_and_reading(monkeypatch):
    clock = Clock()
    out = io.StringIO()
    assert clock.report(out) is None and out.getvalue() == ""  # outside a workflow job: nothing
    monkeypatch.setenv(T0_ENV, repr(time.time() - 2.0))
    with clock.span("read"):
        time.sleep(0.2)
    with clock.span("read"):
        pass
    clock.count("forks", 3)
    line = clock.report(out)
    assert out.getvalue().startswith(PREFIX) and json.loads(out.getvalue()[len(PREFIX):]) == line
    assert 1.9 < line["start_s"] < 2.5 and 0.2 <= line["read_s"] < 0.5
    assert line["processes"] == 2 + 3 and line["forks"] == 3
