"""The benchmarks' one way to time things and to measure peak memory.

- :func:`run_child`: one command in a fresh process: wall seconds and its peak RSS, read by the child
  itself from ``/proc/self/status`` (VmHWM) as it exits. The kernel's ``ru_maxrss`` of a waited child
  can include the pages of the parent it was forked from, so a benchmark holding PyTorch would see its
  own size; VmHWM belongs to the child's final program alone.
- :func:`self_peak_rss_mb` and :func:`process_memory_mb`: the same VmHWM (and VmRSS) of this process, or
  of a running one (a server under load).
- :func:`timed` and :func:`timed_call`: wall seconds of one call (and its result).
- :func:`interleaved`: the cases of a comparison run in turn, round after round (a shared, noisy machine
  slows them alike), and :func:`medians` of the rounds.
- :func:`table`: a Markdown table, as the docs quote them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

# Runs a module as __main__ (argv: the pipe's fd, the module, its arguments) and, at exit, writes this
# process's peak RSS in kB to that pipe.
_REPORTER = (
    "import atexit, os, runpy, sys\n"
    "fd = int(sys.argv.pop(1))\n"
    "def _peak():\n"
    "    kb = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "    os.write(fd, str(kb).encode())\n"
    "atexit.register(_peak)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def run_child(module: str, args: Sequence[str], env: dict | None = None) -> tuple[float, float]:
    """``python -m module args`` in a fresh process, output discarded: (wall seconds, peak RSS in MB).
    A failing command stops the benchmark with its last lines of stderr."""
    read, write = os.pipe()
    cmd = [sys.executable, "-c", _REPORTER, str(write), module, *map(str, args)]
    start = time.perf_counter()
    child = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(write,),
    )
    os.close(write)
    _, err = child.communicate()
    seconds = time.perf_counter() - start
    with os.fdopen(read, "rb") as f:
        reported = f.read().decode()
    if child.returncode not in (0, 1) or not reported:  # 1: some inputs failed, still a measured run
        raise SystemExit(f"{module} {' '.join(map(str, args))} failed: {err.decode()[-800:]}")
    return seconds, int(reported) / 1024


def process_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """A running process's resident memory now (``rss``, VmRSS) and at its peak so far (``peak``, VmHWM), MB."""
    with open(f"/proc/{pid}/status") as f:
        found = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)
                 if k in ("VmRSS", "VmHWM")}  # fmt: skip
    return {"rss": found["VmRSS"], "peak": found["VmHWM"]}


def self_peak_rss_mb() -> float:
    """This process's peak RSS so far, in MB."""
    return process_memory_mb()["peak"]


def timed_call(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall seconds of one call, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    return timed_call(fn)[0]


def interleaved(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each case once per round, in turn: its measurements by name."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, measure in cases.items():
            out[name].append(measure())
    return out


def medians(values: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in values.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
