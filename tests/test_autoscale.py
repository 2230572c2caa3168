"""``pushy.autoscale``: the scaling policy, the fleet reader and the simulator.

The policy and the simulator are pure computations, tested without nodes;
:func:`pushy.autoscale.observe` reads a real ``pushy.Cluster`` of node
processes on a real redis-server, with real devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from pushy import Cluster, ConfigError, DeviceClient
from pushy.autoscale import (
    Backoff,
    FleetSimulator,
    ScalingPolicy,
    diurnal,
    observe,
)
from pushy.testing import RedisServer, scaled, token_for, wait_until

# The policy.


def test_step_grows_exponentially_with_the_excess_over_the_target() -> None:
    policy = ScalingPolicy(100, growth=2.0, max_step=10**6, max_nodes=10**6)
    nodes = 1000

    steps = {
        excess: policy.step(nodes, nodes * 100 * (1 + excess))
        for excess in (0.1, 0.2, 0.4, 0.8)
    }

    for excess, step in steps.items():
        assert step == math.ceil(nodes * (2 ** (2.0 * excess) - 1))
    # Twice the excess: more than twice the nodes, and ever more so.
    ratios = [steps[0.2] / steps[0.1], steps[0.4] / steps[0.2], steps[0.8] / steps[0.4]]
    assert all(r > 2 for r in ratios)
    assert ratios == sorted(ratios)


def test_a_small_excess_adds_at_least_the_nodes_it_needs() -> None:
    policy = ScalingPolicy(200_000, max_nodes=10**6, max_step=10**6)

    decision = policy.decide(1000, 1000 * 210_000, now=0)

    needed = math.ceil(1000 * 210_000 / 200_000) - 1000
    assert decision.action == "add"
    assert needed <= decision.delta <= 2 * needed
    assert "5.0% above the target" in decision.reason


def test_any_excess_adds_one_node_and_the_target_itself_holds() -> None:
    policy = ScalingPolicy(200_000)

    assert policy.decide(10, 10 * 200_000, now=0).action == "hold"
    assert policy.decide(10, 10 * 200_000 + 1, now=0).delta == 1


def test_scale_out_is_bounded_by_max_step_and_max_nodes() -> None:
    policy = ScalingPolicy(100, max_step=5, max_nodes=12)

    assert policy.decide(4, 4 * 100 * 3, now=0).desired_nodes == 9  # max_step
    assert policy.decide(10, 10 * 100 * 3, now=1).desired_nodes == 12  # max_nodes
    at_max = policy.decide(12, 12 * 100 * 3, now=2)
    assert at_max.action == "hold"
    assert "at max_nodes" in at_max.reason


def test_a_huge_excess_does_not_overflow() -> None:
    policy = ScalingPolicy(1, max_step=50, max_nodes=1000)

    assert policy.decide(1, 10**12, now=0).desired_nodes == 51


def test_scale_in_drains_one_node_at_a_time_after_the_cooldown() -> None:
    policy = ScalingPolicy(100, cooldown_s=60)
    policy.decide(10, 10 * 150, now=0)  # a scale-out at time 0

    assert policy.decide(20, 100, now=59).reason == "over-provisioned, cooling down"
    first = policy.decide(20, 100, now=60)
    assert (first.action, first.desired_nodes) == ("drain", 19)
    running = policy.decide(19, 100, now=61, draining=1)
    assert running.reason == "over-provisioned, a drain is running"
    # One at a time however far below the target, and the cooldown again.
    assert policy.decide(19, 100, now=100).reason == "over-provisioned, cooling down"
    assert policy.decide(19, 100, now=120).desired_nodes == 18


def test_scale_in_waits_until_the_fleet_fits_on_one_node_fewer() -> None:
    policy = ScalingPolicy(100, scale_in_threshold=0.8, cooldown_s=0)

    # 10 nodes at 75% of the target: 9 nodes would hold 83% each.
    assert policy.decide(10, 750, now=0).action == "hold"
    assert policy.decide(10, 720, now=0).action == "drain"  # 80% on 9 nodes


def test_the_policy_never_goes_below_min_nodes() -> None:
    policy = ScalingPolicy(100, min_nodes=3, cooldown_s=0)

    assert policy.decide(3, 0, now=0).action == "hold"
    assert policy.decide(4, 0, now=1).desired_nodes == 3
    below = policy.decide(1, 0, now=2)
    assert below.desired_nodes == 3
    assert below.reason == "1 node, below min_nodes"


def test_an_empty_fleet_with_connections_starts_what_they_need() -> None:
    policy = ScalingPolicy(100, min_nodes=0)

    assert policy.decide(0, 0, now=0).desired_nodes == 0
    assert policy.decide(0, 450, now=0).desired_nodes == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_per_node": 0}, "target_per_node must be at least 1, got 0"),
        ({"min_nodes": 5, "max_nodes": 4}, "max_nodes must be at least 1 and min_"),
        ({"scale_in_threshold": 1.0}, "scale_in_threshold must be between 0 and 1"),
        ({"growth": 0}, "growth must be positive, got 0"),
        ({"max_step": 0}, "max_step must be at least 1, got 0"),
        ({"cooldown_s": -1}, "cooldown_s must be at least 0, got -1"),
    ],
)
def test_policy_arguments_out_of_range_are_config_errors(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ScalingPolicy(**kwargs)  # type: ignore[arg-type]


# The simulator.


def test_devices_are_conserved_through_demand_drains_kills_and_scaling() -> None:
    policy = ScalingPolicy(1000, min_nodes=2, cooldown_s=60)
    sim = FleetSimulator(
        diurnal(20_000, day_s=3600, trough=0.3),
        policy=policy,
        lifetime_s=600,
        dt=1.0,
        accept_rate=200,
        drain_over_s=60,
    )
    sim.kill_node(0, at=300)
    sim.drain_node(1, over_s=120, at=900)

    result = sim.run(3600)

    assert np.allclose(result.online + result.waiting, result.devices, rtol=1e-9)
    assert result.nodes.min() >= 2
    assert {kind for _, kind, _ in result.events} >= {"kill", "drain", "add"}


def test_a_killed_node_is_re_homed_within_the_first_backoff_window() -> None:
    backoff = Backoff(first_s=2.0, max_s=16.0)
    sim = FleetSimulator(10_000, nodes=5, dt=0.1, reconnect_backoff=backoff)
    sim.run(100)
    lost = sim.nodes[3].connections

    sim.kill_node(3)
    result = sim.run(30)

    assert lost == pytest.approx(2000)
    assert sim.nodes[3].state == "gone"
    # A twentieth of them reconnect in the kill's own step (2 s in 0.1 s steps).
    assert result.waiting.max() == pytest.approx(0.95 * lost)
    assert result.rehome_time(100) <= backoff.horizon(1) + sim.dt
    assert result.online[-1] == pytest.approx(10_000)


def test_refused_reconnects_back_off_and_are_re_homed_within_the_horizon() -> None:
    backoff = Backoff(first_s=1.0, max_s=8.0)
    sim = FleetSimulator(
        10_000, nodes=5, dt=0.1, accept_rate=200, reconnect_backoff=backoff
    )
    sim.run(100)

    sim.kill_node(0)
    result = sim.run(60)

    assert result.refused_rate.max() > 0
    assert result.connect_rate.max() <= 4 * 200 + 1e-6  # four nodes left
    assert 1.0 < result.rehome_time(100) <= backoff.horizon(backoff.levels + 2)


def test_a_drain_spreads_its_reconnects_evenly_over_over_s() -> None:
    sim = FleetSimulator(10_000, nodes=5, dt=1.0)
    sim.run(100)
    held = sim.nodes[2].connections

    sim.drain_node(2, over_s=300)
    result = sim.run(400)

    during = (result.t > 100) & (result.t <= 400)
    rate = result.drain_rate[during]
    assert rate.max() <= 2 * rate.mean()
    assert rate.min() > 0
    assert result.drain_rate[result.t > 400].max() == 0
    assert sim.nodes[2].state == "gone"
    # What the drain did not move ended its lifetime in the meantime.
    assert 0.8 * held < rate.sum() * sim.dt < held


def test_staggered_lifetimes_keep_the_connect_rate_flat_in_steady_state() -> None:
    sim = FleetSimulator(100_000, nodes=4, lifetime_s=1800, dt=1.0)

    result = sim.run(3 * 1800)

    mean_lifetime = 1800 - sim.stagger_s / 2
    assert result.connect_rate.mean() == pytest.approx(
        100_000 / mean_lifetime, rel=1e-6
    )
    assert result.connect_rate.max() <= 1.001 * result.connect_rate.min()


def test_a_cold_start_storm_spreads_out_generation_by_generation() -> None:
    sim = FleetSimulator(100_000, nodes=4, lifetime_s=600, dt=1.0, warm=False)

    result = sim.run(12 * 600)

    assert result.connect_rate[0] == pytest.approx(100_000)  # all at once
    peaks = [
        result.connect_rate[(result.t > k * 600) & (result.t <= (k + 1) * 600)].max()
        for k in range(1, 12)
    ]
    assert peaks == sorted(peaks, reverse=True)
    # Each generation widens by the stagger: ten of them to halve the peak.
    assert peaks[9] < 0.5 * peaks[0]


def test_least_connections_fills_a_new_node_first_and_random_does_not() -> None:
    def new_node_share(balancer: str) -> float:
        sim = FleetSimulator(
            40_000, nodes=4, dt=1.0, start_delay_s=10, balancer=balancer
        )
        sim.add_nodes(1)
        sim.run(600)  # the fleet reconnects 23.4 devices/s: 8,000 in 342 s
        return sim.nodes[4].connections / 8000

    assert new_node_share("least-connections") == pytest.approx(1.0, rel=0.01)
    assert new_node_share("random") < 0.5


def test_the_policy_scales_a_simulated_fleet_with_its_demand() -> None:
    policy = ScalingPolicy(1000, min_nodes=2, cooldown_s=30)
    sim = FleetSimulator(
        diurnal(50_000, day_s=7200), policy=policy, lifetime_s=300, dt=1.0,
        policy_interval_s=10, start_delay_s=10, drain_over_s=20,
    )  # fmt: skip

    result = sim.run(7200)

    trough = (result.t > 2600) & (result.t < 2800)  # 17,500 devices
    assert result.nodes[0] == 46
    assert result.nodes[trough].max() <= math.ceil(17_500 / 800) + 1
    assert result.nodes.max() == 50  # at the peak, 50,000
    assert result.max_per_node[result.t > 3000].max() < 1.02 * 1000


def test_simulator_arguments_out_of_range_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="balancer must be 'least-connections'"):
        FleetSimulator(100, balancer="round-robin")
    with pytest.raises(ConfigError, match="stagger_s must be from 0 to"):
        FleetSimulator(100, lifetime_s=100, stagger_s=99)
    sim = FleetSimulator(100, nodes=2)
    with pytest.raises(ConfigError, match="node must be the id of a node"):
        sim.kill_node(7)


# Reading a real fleet.


async def test_observe_reads_a_real_cluster_for_the_policy(
    redis_server: RedisServer, cluster_factory: Callable[..., Cluster]
) -> None:
    cluster = cluster_factory(2, redis=redis_server.url)
    urls = [node.push_url for node in cluster.nodes]
    assert all(urls)
    before = observe(urls)  # type: ignore[arg-type]
    devices = [DeviceClient(cluster.url, token_for(f"d{i}")) for i in range(6)]
    try:
        for device in devices:
            await device.connect()
        sample = wait_until(
            lambda: (s := observe(urls)).connections == 6 and s,  # type: ignore[arg-type]
            timeout=scaled(10),
            message="6 connections in /v1/stats",
        )

        assert sample.serving == 2 and sample.draining == 0
        assert {n.node for n in sample.nodes} == {n.node_id for n in cluster.nodes}
        rates = sample.rates(before)
        assert rates.connects_per_s * rates.interval_s == pytest.approx(6)
        decision = sample.decide(ScalingPolicy(2))
        assert (decision.action, decision.desired_nodes) == ("add", 4)

        cluster.nodes[0].kill()
        after = observe(urls, timeout=scaled(2))  # type: ignore[arg-type]
        assert after.unreachable == (urls[0],)
        assert [n.node for n in after.nodes] == [cluster.nodes[1].node_id]
    finally:
        for device in devices:
            await device.close()


def test_simulator_refuses_a_negative_fleet_or_one_without_nodes() -> None:
    with pytest.raises(ConfigError, match="devices must be a number"):
        FleetSimulator(-1)
    with pytest.raises(ConfigError, match="nodes must be at least 1"):
        FleetSimulator(1e6, nodes=0, per_node_target=1000)
    # A policy with a minimum starts what the devices need.
    FleetSimulator(1e6, nodes=0, per_node_target=1000, policy=ScalingPolicy(1000))
