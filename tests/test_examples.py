"""The examples and the notebook run as a user would run them.

``examples/quickstart.py`` runs in a subprocess of the current interpreter;
``notebooks/quickstart.ipynb`` is executed with nbclient in an ipykernel of
the current interpreter. Files are found relative to this test file, so the
test works from a clone and with pushy installed into a virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from pushy.testing import scaled

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"
REMOTE_CONTROL = ROOT / "examples" / "remote_control.py"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


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


def test_quickstart_notebook_runs_and_plots_the_latencies(python3_kernel: str) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)

    client = nbclient.NotebookClient(
        nb,
        kernel_name=python3_kernel,
        timeout=int(scaled(120)),
        startup_timeout=int(scaled(60)),
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [
        output
        for cell in code_cells
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
    plots = [cell for cell in code_cells if "plot" in cell.metadata.get("tags", [])]
    assert len(plots) == 1
    assert any("image/png" in output.get("data", {}) for output in plots[0].outputs)
    text = "".join(
        output.get("text", "")
        for cell in code_cells
        for output in cell.outputs
        if output.output_type == "stream" and output.get("name") == "stdout"
    )
    assert "1000/1000 delivered" in text
    assert "push latency: p50 " in text
    assert "node stopped: True" in text
