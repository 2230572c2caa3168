"""The examples and the notebooks run as a user would run them.

``examples/quickstart.py`` runs in a subprocess of the current interpreter;
``notebooks/quickstart.ipynb`` and ``notebooks/autoscale.ipynb`` are executed
with nbclient in an ipykernel of the current interpreter. Files are found
relative to this test file, so the test works from a clone and with pushy
installed into a virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest
from pushy.testing import scaled

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"
REMOTE_CONTROL = ROOT / "examples" / "remote_control.py"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
AUTOSCALE_NOTEBOOK = ROOT / "notebooks" / "autoscale.ipynb"


def _child_env() -> dict[str, str]:
    """The environment of a child interpreter that imports this pushy."""
    import pushy

    env = dict(os.environ)
    package_parent = str(Path(pushy.__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_example(path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run an example script as a user would, from the clone's root."""
    return subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_child_env(),
        cwd=ROOT,
        check=False,
    )


def test_remote_control_example_drives_the_tv_across_two_nodes() -> None:
    proc = run_example(REMOTE_CONTROL, scaled(90))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    tv_node, phone_node = re.search(
        r"living-room-tv on (\S+), phone-1 on (\S+)", out
    ).groups()  # type: ignore[union-attr]
    assert tv_node != phone_node
    answers = re.findall(r"phone -> living-room-tv (.*): 200; tv answered (.*) \(", out)
    assert [a[0] for a in answers] == [
        "{'cmd': 'play'}",
        "{'cmd': 'pause'}",
        "{'cmd': 'seek', 'to': 42}",
        "{'cmd': 'play'}",
    ], out
    assert "'state': 'paused', 'position': 42.0" in answers[2][1]
    assert "phone -> kitchen-tv {'cmd': 'play'}: 404" in out
    assert "phone -> neighbour-tv {'cmd': 'play'}: 403" in out
    assert out.rstrip().endswith("cluster stopped")


def test_quickstart_script_pushes_to_two_devices_and_exits_0() -> None:
    proc = run_example(QUICKSTART, scaled(60))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("node node-")
    assert any(line.startswith("tv-1 connected: {") for line in lines)
    assert any(line.startswith("phone-1 connected: {") for line in lines)
    assert any(
        line.startswith("push to tv-1 (ack=written): 200 delivered in ")
        for line in lines
    ), proc.stdout
    assert any(
        line.startswith("push to phone-1 (ack=client): 200 delivered in ")
        for line in lines
    ), proc.stdout
    received = [line for line in lines if " received: " in line]
    assert len(received) == 2
    assert json.loads(received[1].split(" received: ", 1)[1])["ack"] is True
    assert lines[-1] == "node stopped"


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs this interpreter, found first.

    A ``python3`` kernelspec elsewhere (the user's, the system's) could start
    another interpreter, one without this pushy.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pushy tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    jupyter_path = [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, jupyter_path)))
    # Jupyter's own deprecation notice about its paths (warnings are errors).
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    for name, value in _child_env().items():
        monkeypatch.setenv(name, value)
    return "python3"


@dataclass
class ExecutedNotebook:
    """What the code cells of an executed notebook put out."""

    errors: list[Any]
    plots: list[Any]  # the code cells tagged "plot"
    stdout: str

    def images(self, plot: Any) -> int:
        """The PNG images among a plot cell's outputs."""
        return sum("image/png" in output.get("data", {}) for output in plot.outputs)


def execute_notebook(path: Path, kernel_name: str) -> ExecutedNotebook:
    """Run every cell of a notebook, in its folder, as Jupyter would."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=int(scaled(120)),
        startup_timeout=int(scaled(60)),
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [output for cell in code_cells for output in cell.outputs]
    return ExecutedNotebook(
        errors=[output for output in outputs if output.output_type == "error"],
        plots=[cell for cell in code_cells if "plot" in cell.metadata.get("tags", [])],
        stdout="".join(
            output.get("text", "")
            for output in outputs
            if output.output_type == "stream" and output.get("name") == "stdout"
        ),
    )


def test_quickstart_notebook_runs_and_plots_the_latencies(python3_kernel: str) -> None:
    run = execute_notebook(NOTEBOOK, python3_kernel)

    assert not run.errors, run.errors
    assert len(run.plots) == 1
    assert run.images(run.plots[0]) >= 1
    text = run.stdout
    assert "1000/1000 delivered" in text
    assert "push latency: p50 " in text
    assert "node stopped: True" in text


def test_autoscale_notebook_plots_a_simulated_day_and_a_reconnect_storm(
    python3_kernel: str,
) -> None:
    started = time.perf_counter()
    run = execute_notebook(AUTOSCALE_NOTEBOOK, python3_kernel)
    elapsed = time.perf_counter() - started

    assert not run.errors, run.errors
    assert len(run.plots) == 2  # the day, then the node loss
    assert [run.images(plot) for plot in run.plots] == [1, 1]
    text = run.stdout
    assert "simulated 24 h in " in text
    assert "devices conserved: True" in text
    assert "node 0 held 200,000 connections" in text
    rehomed = re.findall(r"all re-homed in ([0-9.]+) s", text)
    assert len(rehomed) == 3, text
    assert float(rehomed[0]) <= 1.1  # within the first backoff window
    assert elapsed < scaled(60)
