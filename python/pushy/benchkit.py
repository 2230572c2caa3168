"""Measurement pieces shared by ``pushy bench`` and ``benchmarks/``.

Reading a process's memory and CPU time and the kernel's slab from
``/proc``, splitting connections over load generator processes, running
``pushy-loadgen`` processes whose output goes to files, the median, min
and max of a figure over runs, and the console: progress bars during long
phases and tables of figures (with ``rich`` when it is installed, plain
lines otherwise).

Limitations:
    Linux only (``/proc``). ``Slab`` is system-wide: whatever else runs on
    the host shows up in it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import PushyError

__all__ = [
    "MAX_PER_PROCESS",
    "BenchError",
    "Loadgen",
    "Progress",
    "count",
    "figure_table",
    "cpu_seconds",
    "listen_drops",
    "merge_reasons",
    "read_meminfo_kib",
    "read_status_kib",
    "sample_memory",
    "split",
    "stop_loadgens",
    "summarize",
    "wait_for",
]

#: Sockets one process (node or load generator) may hold here: the host
#: caps a process at 20,000 open files, and a few are needed for the rest.
MAX_PER_PROCESS = 19_000

T = TypeVar("T")


class BenchError(PushyError):
    """A benchmark run could not complete (a process failed, a wait timed
    out)."""


def read_status_kib(pid: int, key: str) -> int:
    """Return a ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``).

    Raises:
        BenchError: the field is not there.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def read_meminfo_kib(key: str) -> int:
    """Return a ``/proc/meminfo`` field in KiB (``Slab``, ``SUnreclaim``).

    Raises:
        BenchError: the field is not there.
    """
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/meminfo")


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime, fields 14 and 15 of proc(5), counted after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listen_drops() -> int:
    """Return the host's TcpExt ListenDrops counter (SYNs or accepts lost)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split(), values.split(), strict=True))
            return int(row["ListenDrops"])
    return 0


def sample_memory(pids: Iterable[int]) -> dict[str, int]:
    """Return the summed RSS of the processes and the kernel's slab, in
    bytes: ``rss``, ``slab``, ``slab_unreclaimable``."""
    return {
        "rss": sum(read_status_kib(p, "VmRSS") for p in pids) * 1024,
        "slab": read_meminfo_kib("Slab") * 1024,
        "slab_unreclaimable": read_meminfo_kib("SUnreclaim") * 1024,
    }


def wait_for(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll ``predicate()`` until it returns a true value; return it.

    Raises:
        BenchError: it stayed false for ``timeout`` seconds.
    """
    from .testing import wait_until

    try:
        return wait_until(predicate, timeout, interval, what)  # type: ignore[no-any-return]
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


def number(text: str) -> float:
    """An option's number (``type=`` of an ``argparse`` option): finite,
    so that NaN or infinity is refused with the option's name.

    Raises:
        argparse.ArgumentTypeError: not a finite number.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def numbers(text: str, option: str) -> list[float]:
    """A comma list of finite numbers (``--rates``), each as :func:`number`.

    Raises:
        PushyError: an item is not a finite number.
    """
    try:
        return [number(r) for r in str(text).split(",") if r.strip()]
    except argparse.ArgumentTypeError:
        raise PushyError(f"{option} must be finite numbers, got {text!r}") from None


def count(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless ``n`` is 1: "1 node", "3 runs"."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def split(n: int, per_process: int) -> list[int]:
    """Split n connections over as few processes of at most ``per_process``
    as possible, evenly."""
    k = math.ceil(n / per_process)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Return the median, min and max of the values."""
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def merge_reasons(reports: Iterable[dict[str, Any]], key: str) -> dict[str, int]:
    """Sum the ``key`` maps (reason: count) of load generator reports."""
    total: dict[str, int] = {}
    for r in reports:
        for why, n in r.get(key, {}).items():
            total[why] = total.get(why, 0) + int(n)
    return total


@dataclass
class Loadgen:
    """One running ``pushy-loadgen``; its stdout and stderr go to files.

    Attributes:
        proc: the process.
        connections: how many connections it opens.
        stdout_path, stderr_path: its output files.
        report: its final JSON report, once :meth:`stop` collected it.
    """

    proc: subprocess.Popen[bytes]
    connections: int
    stdout_path: Path
    stderr_path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        binary: str | Path,
        *,
        port: int,
        tokens: Path | None,
        connections: int,
        rate: float,
        hold_s: float,
        workdir: Path,
        name: str,
        host: str = "127.0.0.1",
        source_addrs: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> Loadgen:
        """Start a load generator opening ``connections`` connections (line
        i of ``tokens`` is the token of connection i; ``None`` when
        ``extra`` says what to connect to instead, e.g. ``--subscribe``) at
        ``rate`` per second and holding them ``hold_s`` seconds (or until
        :meth:`stop`)."""
        out = workdir / f"{name}.stdout"
        err = workdir / f"{name}.stderr"
        cmd = [
            str(binary), "--host", host, "--port", str(port),
            "--connections", str(connections),
            "--rate", str(rate), "--hold-s", str(hold_s), "--json",
        ]  # fmt: skip
        if tokens is not None:
            cmd += ["--tokens", str(tokens)]
        if source_addrs:
            cmd += ["--source-addrs", ",".join(source_addrs)]
        cmd += list(extra)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        return cls(proc, connections, out, err)

    def ready(self) -> dict[str, Any] | None:
        """Return its ``ready`` event (``connected``, ``failed``) once it has
        printed it (its connect phase is over), else ``None``.

        Raises:
            BenchError: it exited before.
        """
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if line.startswith('{"event":"ready"'):
                return dict(json.loads(line))
        if self.proc.poll() is not None:
            raise BenchError(
                f"load generator exited with {self.proc.returncode}: "
                f"{self.stderr_path.read_text(errors='replace')[-2000:]}"
            )
        return None

    def last_event(self, name: str) -> dict[str, Any] | None:
        """Return the last ``{"event":NAME,...}`` line it printed to stderr
        (``stats`` lines come every ``--stats-s``), else ``None``."""
        with open(self.stderr_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode(errors="replace")
        head = '{"event":"' + name + '"'
        for line in reversed(tail.splitlines()):
            if line.startswith(head):
                try:
                    return dict(json.loads(line))
                except ValueError:  # a line being written
                    continue
        return None

    def pushes(self) -> dict[str, int]:
        """Return its latest count of pushes received (with ``--pushes``):
        ``received`` and ``last_ns``, the CLOCK_MONOTONIC time of the last
        one (both 0 before the first)."""
        latest = {"received": 0, "last_ns": 0}
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if line.startswith('{"event":"pushes"'):
                latest = json.loads(line)
        return {"received": int(latest["received"]),
                "last_ns": int(latest["last_ns"])}

    def cpu_seconds(self) -> float:
        """Its CPU time so far (0 once it has exited)."""
        try:
            return cpu_seconds(self.proc.pid)
        except (OSError, IndexError, ValueError):
            return 0.0


def stop_loadgens(gens: Iterable[Loadgen], timeout: float = 30) -> None:
    """Ask every load generator to close its connections (SIGTERM), wait
    (kill at ``timeout``) and collect each one's report."""
    gens = list(gens)
    for g in gens:
        if g.proc.poll() is None:
            g.proc.send_signal(signal.SIGTERM)
    for g in gens:
        try:
            g.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            g.proc.kill()
            g.proc.wait()
        text = g.stdout_path.read_text(errors="replace").strip()
        g.report = json.loads(text.splitlines()[-1]) if text.startswith("{") else {}



class Progress:
    """Progress of a long phase: a live bar on a terminal (with ``rich``),
    else a line through ``say`` at most every ``every_s`` seconds.

    Use as a context manager; call :meth:`update` with the count done so
    far (a number of ``total``).
    """

    def __init__(
        self, what: str, total: float, say: Callable[[str], Any] = print,
        unit: str = "", every_s: float = 2.0,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self._say, self._every = say, every_s
        self._started = time.monotonic()
        self._next = self._started + every_s
        self._bar: Any = None
        self._task: Any = None
        if say is print and sys.stdout.isatty():
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                )
                from rich.progress import Progress as Bar
            except ImportError:
                return
            self._bar = Bar(TextColumn("  {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=True)
            self._task = self._bar.add_task(what, total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, done: float) -> None:
        """Show ``done`` of the total."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._every
            self._say(f"  {now - self._started:5.1f} s: {done:,.0f} of "
                      f"{self.total:,.0f} {self.unit or self.what}")


def figure_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """Lines of a table of ``rows`` under ``header`` (the first column
    left-aligned, the rest right-aligned): drawn by ``rich`` when it is
    installed, plain columns otherwise."""
    try:
        import io

        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [header, *rows])
                  for i in range(len(header))]
        return [
            "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in [header, *rows]
        ]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*map(str, row))
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, highlight=False).print(table)
    return [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
