"""The ``pushy.testing`` pytest plugin works for a user's own test suite.

Each test writes a small user project and runs pytest on it in a subprocess
(pytester), as a user of an installed pushy would.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pushy
import pytest

pytest_plugins = ["pytester"]

USER_TEST = """
import pushy


async def test_push_reaches_my_device(pushy_node, device_factory, push_client):
    device = await device_factory("my-tv", account="me")

    result = await push_client.apush("my-tv", {"hello": "world"})
    message = await device.receive(timeout=5)

    assert result.delivered
    assert result.node == pushy_node.node_id
    assert message["t"] == "push"
    assert message["data"] == {"hello": "world"}
"""

USER_FAILING_TEST = """
async def test_push_to_a_device_that_is_not_there(push_client):
    result = await push_client.apush("nobody", 1)

    assert result.delivered
"""

USER_SYNC_TEST = """
import pushy


def test_two_nodes_from_the_factory(pushy_node, pushy_node_factory, pushy_secret):
    other = pushy_node_factory(node_id="second")

    assert other.running and pushy_node.running
    assert other.node_id == "second"
    assert other.port != pushy_node.port
    assert pushy_node.config.secret == pushy_secret
"""


def _plugin_installed() -> bool:
    eps = metadata.entry_points(group="pytest11")
    return any(ep.value == "pushy.testing" for ep in eps)


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project whose pytest runs find pushy and its plugin."""
    source = str(Path(pushy.__file__).resolve().parent.parent)
    paths = [source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    pytester.makeini(
        "[pytest]\n"
        "asyncio_mode = auto\n"
        "asyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    if not _plugin_installed():
        # From a source tree the entry point is not registered.
        pytester.makeconftest('pytest_plugins = ["pushy.testing"]\n')
    return pytester.path


def test_user_test_pushing_to_a_device_with_the_plugin_fixtures_passes(
    pytester: pytest.Pytester, user_project: Path
) -> None:
    pytester.makepyfile(test_user=USER_TEST)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)


def test_user_test_with_a_wrong_expectation_fails_through_the_plugin(
    pytester: pytest.Pytester, user_project: Path
) -> None:
    pytester.makepyfile(test_user=USER_FAILING_TEST)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*status='not_connected'*"])


def test_user_sync_test_gets_nodes_from_the_node_fixtures(
    pytester: pytest.Pytester, user_project: Path
) -> None:
    pytester.makepyfile(test_user=USER_SYNC_TEST)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)
