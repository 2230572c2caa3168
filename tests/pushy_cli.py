"""Running the ``pushy`` command line in subprocesses, as a user runs it.

Every command runs as ``python -m pushy ...`` with ``PYTHONPATH`` leading to
the package under test, so the tests work the same from a source tree and
with pushy installed in a virtual environment. ``PUSHY_*`` variables of the
calling environment are left out (but the test time unit), so that only what
a test passes counts.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import pushy
from pushy.testing import scaled

__all__ = ["PushyProcess", "arun_pushy", "cli_env", "run_pushy"]


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a ``pushy`` subprocess, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PUSHY_") or k == "PUSHY_TEST_TIME_UNIT"
    }
    source = str(Path(pushy.__file__).resolve().parent.parent)
    paths = [source, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def run_pushy(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``pushy ARGS`` to completion and return its outcome.

    ``timeout`` is in seconds, ``scaled(30)`` by default.
    """
    return subprocess.run(
        [sys.executable, "-m", "pushy", *args],
        capture_output=True,
        text=True,
        env=cli_env(env),
        timeout=scaled(30) if timeout is None else timeout,
        cwd=cwd,
        check=False,
    )


async def arun_pushy(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """:func:`run_pushy` in a thread, so that device clients keep running."""
    return await asyncio.to_thread(run_pushy, *args, **kwargs)


class PushyProcess:
    """A running ``pushy ARGS`` whose stdout lines are read with a deadline.

    Reader threads keep every line of stdout and stderr; :meth:`close` (or
    the fixture that made it) kills the process if it still runs.
    """

    def __init__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pushy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(env),
            cwd=cwd,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pumps = [
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.process.stdout, self.stdout),
                (self.process.stderr, self.stderr),
            )
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if lines is self.stdout:
                self._lines.put(line)
        if lines is self.stdout:
            self._lines.put(None)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read stdout until a line matches ``pattern``; return the match.

        Raises:
            TimeoutError: no such line within ``timeout`` seconds.
            AssertionError: the process exited first.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {pattern!r}:\n{self.output}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.process.wait(timeout=scaled(5))
                raise AssertionError(f"exited with {code}:\n{self.output}")
            match = re.search(pattern, line)
            if match:
                return match

    def finish(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send ``sig``, wait for the exit and the readers; return the code."""
        self.process.send_signal(sig)
        code = self.process.wait(timeout=scaled(30) if timeout is None else timeout)
        for pump in self._pumps:
            pump.join(timeout=scaled(5))
        return code

    @property
    def output(self) -> str:
        """Everything the process wrote so far: stdout, then stderr."""
        return "".join(self.stdout) + "".join(self.stderr)

    def close(self) -> None:
        """Kill the process if it still runs, and close its pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=scaled(10))
        for pump in self._pumps:
            pump.join(timeout=scaled(10))
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
