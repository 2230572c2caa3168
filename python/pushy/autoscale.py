"""Autoscaling on connections: a scaling policy, a fleet reader and a simulator.

A node's cost is the connections it holds (memory per connection, the
heartbeats, the reconnects it absorbs), not its CPU, which stays low on an
idle fleet of millions of devices. :class:`ScalingPolicy` therefore scales on
the average number of connections per node:

* above ``target_per_node`` it adds nodes, a step that grows exponentially
  with how far the average is above the target
  (``step = ceil(nodes * (2 ** (growth * excess) - 1))``, see
  :meth:`ScalingPolicy.step`), bounded by ``max_step`` and ``max_nodes``;
* when the connections would fit on one node fewer at ``scale_in_threshold``
  of the target, it drains one node, never while another drain runs, never
  within ``cooldown_s`` of the last change and never below ``min_nodes``.

:func:`observe` reads those numbers from real nodes' ``GET /v1/stats``, and
:class:`FleetSimulator` runs the policy against a model of a fleet: devices
that come and go over the day, connections that end after a staggered
lifetime and reconnect through a load balancer, nodes added, drained and
killed (the reconnect storm).

The policy and :func:`observe` need only the standard library; the simulator
needs numpy (``pip install 'pushy[sim]'``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, PushError, PushyError
from .push import PushClient

try:  # numpy is needed by the simulator only
    import numpy as np
except ImportError:  # pragma: no cover - numpy is in the test extras
    np = None  # type: ignore[assignment]

__all__ = [
    "Backoff",
    "Decision",
    "FleetRates",
    "FleetSample",
    "FleetSimulator",
    "NodeSample",
    "ScalingPolicy",
    "SimNode",
    "SimulationResult",
    "diurnal",
    "observe",
]


# The policy.


@dataclass(frozen=True)
class Decision:
    """What :meth:`ScalingPolicy.decide` wants the fleet to be.

    Args:
        nodes: the node count the decision was made for.
        desired_nodes: the node count wanted; above ``nodes`` means start
            the difference, ``nodes - 1`` means drain one node.
        reason: why, in words (lower-case, with the numbers).
    """

    nodes: int
    desired_nodes: int
    reason: str

    @property
    def delta(self) -> int:
        """Nodes to add (positive) or to drain (negative)."""
        return self.desired_nodes - self.nodes

    @property
    def action(self) -> str:
        """``"add"``, ``"drain"`` or ``"hold"``."""
        if self.delta > 0:
            return "add"
        if self.delta < 0:
            return "drain"
        return "hold"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class ScalingPolicy:
    """Scale a fleet on its average connections per node.

    Each call of :meth:`decide` looks at the nodes that serve or will serve
    (running and starting, not draining) and the connections the fleet holds
    (the draining nodes' included: they are about to move):

    * ``average = connections / nodes`` and
      ``excess = average / target_per_node - 1``;
    * ``excess > 0``: add :meth:`step` nodes, at most up to ``max_nodes``.
      Scale-out is never held by the cooldown: a decision counts its new
      nodes at once (as starting), so it is not taken twice;
    * when ``connections <= scale_in_threshold * target_per_node * (nodes -
      1)``, the fleet is over-provisioned by at least one node even after
      the drain: drain one node, unless a drain is running, the last change
      was less than ``cooldown_s`` ago, or the fleet is at ``min_nodes``;
    * fewer nodes than ``min_nodes``: go to ``min_nodes``; more than
      ``max_nodes``: drain one.

    The policy keeps the time of the last change it decided, so it assumes
    its decisions are carried out.

    Args:
        target_per_node: connections per node the fleet aims at.
        min_nodes: never fewer nodes than this.
        max_nodes: never more nodes than this.
        growth: ``k`` of the step formula; the step for a small excess is
            about ``k * ln 2 * excess * nodes`` (1.39 times what the excess
            needs with the default 2), and doubles every ``1 / k`` of excess.
        max_step: most nodes added by one decision.
        scale_in_threshold: fraction of the target the fleet must stay under
            with one node fewer for a drain (below 1: the gap between it and
            the target keeps the policy from flapping).
        cooldown_s: seconds after the last change before a drain.

    Raises:
        ConfigError: an argument is out of range.

    Limitations:
        Scale-in is one node at a time, so a fleet shrinks by at most one
        node per ``max(cooldown_s, drain time, decision interval)``: after
        the evening peak a large fleet stays over-provisioned for a while.
        The policy sees no CPU, memory or push rate, only connections.
    """

    def __init__(
        self,
        target_per_node: int = 200_000,
        *,
        min_nodes: int = 1,
        max_nodes: int = 10_000,
        growth: float = 2.0,
        max_step: int = 100,
        scale_in_threshold: float = 0.8,
        cooldown_s: float = 300.0,
    ) -> None:
        _require(
            target_per_node >= 1,
            f"target_per_node must be at least 1, got {target_per_node!r}",
        )
        _require(min_nodes >= 0, f"min_nodes must be at least 0, got {min_nodes!r}")
        _require(
            max_nodes >= max(1, min_nodes),
            f"max_nodes must be at least 1 and min_nodes, got {max_nodes!r}",
        )
        _require(growth > 0, f"growth must be positive, got {growth!r}")
        _require(max_step >= 1, f"max_step must be at least 1, got {max_step!r}")
        _require(
            0 < scale_in_threshold < 1,
            f"scale_in_threshold must be between 0 and 1, got {scale_in_threshold!r}",
        )
        _require(cooldown_s >= 0, f"cooldown_s must be at least 0, got {cooldown_s!r}")
        self.target_per_node = int(target_per_node)
        self.min_nodes = int(min_nodes)
        self.max_nodes = int(max_nodes)
        self.growth = float(growth)
        self.max_step = int(max_step)
        self.scale_in_threshold = float(scale_in_threshold)
        self.cooldown_s = float(cooldown_s)
        self.last_change: float | None = None

    def __repr__(self) -> str:
        return (
            f"ScalingPolicy(target_per_node={self.target_per_node}, "
            f"min_nodes={self.min_nodes}, max_nodes={self.max_nodes}, "
            f"growth={self.growth}, max_step={self.max_step}, "
            f"scale_in_threshold={self.scale_in_threshold}, "
            f"cooldown_s={self.cooldown_s})"
        )

    def step(self, nodes: int, connections: float) -> int:
        """Return the nodes to add for this load, before the ``max_nodes`` bound.

        ``step = ceil(nodes * (2 ** (growth * excess) - 1))``, at least 1
        and at most ``max_step``, where ``excess = connections / (nodes *
        target_per_node) - 1``; 0 when the average is not above the target.

        Args:
            nodes: nodes serving or starting (at least 1).
            connections: connections held by the fleet.

        Raises:
            ConfigError: ``nodes`` is below 1.
        """
        _require(nodes >= 1, f"nodes must be at least 1, got {nodes!r}")
        excess = connections / (nodes * self.target_per_node) - 1
        if excess <= 0:
            return 0
        # 2 ** 64 - 1 nodes is past any max_step: avoid the float overflow.
        factor = math.expm1(min(self.growth * excess, 64.0) * math.log(2))
        return max(1, min(self.max_step, math.ceil(nodes * factor - 1e-9)))

    def decide(
        self, nodes: int, connections: float, now: float, *, draining: int = 0
    ) -> Decision:
        """Decide the node count for the fleet's load now.

        Args:
            nodes: nodes serving or starting, not draining.
            connections: connections held by every node, draining ones too.
            now: the time, in seconds on any clock that only goes forward
                (the same one on every call).
            draining: nodes being drained now.

        Raises:
            ConfigError: a count is negative.
        """
        _require(nodes >= 0, f"nodes must be at least 0, got {nodes!r}")
        _require(
            connections >= 0, f"connections must be at least 0, got {connections!r}"
        )
        _require(draining >= 0, f"draining must be at least 0, got {draining!r}")
        target = self.target_per_node
        if nodes < self.min_nodes:
            plural = "" if nodes == 1 else "s"
            return self._change(
                nodes, self.min_nodes, now, f"{nodes} node{plural}, below min_nodes"
            )
        if nodes > self.max_nodes:
            if draining:
                return Decision(nodes, nodes, "above max_nodes, a drain is running")
            return self._change(nodes, nodes - 1, now, "above max_nodes: drain one")
        if nodes == 0:
            if connections <= 0:
                return Decision(0, 0, "no nodes and no connections")
            wanted = min(self.max_nodes, self.max_step, math.ceil(connections / target))
            return self._change(
                0, wanted, now, f"{connections:,.0f} connections and no nodes"
            )
        average = connections / nodes
        step = self.step(nodes, connections)
        if step > 0:
            if nodes >= self.max_nodes:
                return Decision(
                    nodes, nodes, f"average {average:,.0f} above target, at max_nodes"
                )
            desired = min(self.max_nodes, nodes + step)
            excess = average / target - 1
            return self._change(
                nodes,
                desired,
                now,
                f"average {average:,.0f} is {excess:.1%} above the target "
                f"{target:,}: add {desired - nodes}",
            )
        fits_one_fewer = connections <= self.scale_in_threshold * target * (nodes - 1)
        if nodes > self.min_nodes and fits_one_fewer:
            if draining:
                return Decision(nodes, nodes, "over-provisioned, a drain is running")
            if (
                self.last_change is not None
                and now - self.last_change < self.cooldown_s
            ):
                return Decision(nodes, nodes, "over-provisioned, cooling down")
            return self._change(
                nodes,
                nodes - 1,
                now,
                f"average {average:,.0f} fits on {nodes - 1} nodes under "
                f"{self.scale_in_threshold:.0%} of the target: drain one",
            )
        return Decision(nodes, nodes, f"average {average:,.0f} within the target")

    def _change(self, nodes: int, desired: int, now: float, reason: str) -> Decision:
        self.last_change = now
        return Decision(nodes, desired, reason)


# Reading a real fleet.


@dataclass(frozen=True)
class NodeSample:
    """One node's numbers from its ``GET /v1/stats``.

    Args:
        url: the node's push API base URL.
        node: the node id.
        connections: devices connected now.
        opened: connections upgraded since the node started.
        closed: connections ended since the node started.
        draining: whether the node reports a drain in progress.
        reconnects: reconnects the node asked for since it started (lifetime
            and drain), or ``None`` when the node does not report them.
        uptime_s: seconds since the node started.
    """

    url: str
    node: str
    connections: int
    opened: int
    closed: int
    draining: bool
    reconnects: int | None
    uptime_s: float

    @classmethod
    def from_stats(cls, url: str, stats: Mapping[str, Any]) -> NodeSample:
        """Read a node's ``/v1/stats`` answer; absent fields read as 0 or ``None``.

        ``drain`` is read as an object with a ``draining`` flag, and
        ``reconnects`` as a count or as an object of counts (summed).
        """
        drain = stats.get("drain", {})
        reconnects = stats.get("reconnects")
        if isinstance(reconnects, Mapping):
            reconnects = sum(int(v) for v in reconnects.values() if _is_number(v))
        return cls(
            url=url,
            node=str(stats.get("node", url)),
            connections=int(stats.get("connections", 0)),
            opened=int(stats.get("connections_opened", 0)),
            closed=int(stats.get("connections_closed", 0)),
            draining=bool(drain.get("draining", False))
            if isinstance(drain, Mapping)
            else False,
            reconnects=int(reconnects) if _is_number(reconnects) else None,
            uptime_s=float(stats.get("uptime_s", 0.0)),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class FleetRates:
    """Per-second rates between two :class:`FleetSample` readings.

    Args:
        interval_s: seconds between the readings.
        connects_per_s: connections opened per second.
        disconnects_per_s: connections ended per second.
        reconnects_per_s: reconnects asked for per second, or ``None`` when
            a node does not report them.
    """

    interval_s: float
    connects_per_s: float
    disconnects_per_s: float
    reconnects_per_s: float | None


@dataclass(frozen=True)
class FleetSample:
    """The fleet's numbers read at one moment by :func:`observe`.

    Args:
        at: ``time.monotonic()`` when the reading ended.
        nodes: the nodes that answered.
        unreachable: push URLs of the nodes that did not answer.
    """

    at: float
    nodes: tuple[NodeSample, ...]
    unreachable: tuple[str, ...] = ()

    @property
    def connections(self) -> int:
        """Connections on every node that answered."""
        return sum(n.connections for n in self.nodes)

    @property
    def serving(self) -> int:
        """Nodes that answered and are not draining."""
        return sum(not n.draining for n in self.nodes)

    @property
    def draining(self) -> int:
        """Nodes that answered and are draining."""
        return sum(n.draining for n in self.nodes)

    def decide(
        self, policy: ScalingPolicy, *, starting: int = 0, now: float | None = None
    ) -> Decision:
        """Run ``policy`` on this reading.

        Args:
            policy: the policy.
            starting: nodes started but not answering yet (they count as
                nodes, so a scale-out is not decided twice).
            now: the time for the cooldown; ``at`` by default.
        """
        return policy.decide(
            self.serving + starting,
            self.connections,
            self.at if now is None else now,
            draining=self.draining,
        )

    def rates(self, earlier: FleetSample) -> FleetRates:
        """Return the rates between ``earlier`` and this reading.

        Only nodes in both readings count. A node whose counters went down
        restarted in between: its counters since the restart count.

        Raises:
            PushyError: ``earlier`` is not earlier than this reading.
        """
        interval = self.at - earlier.at
        if interval <= 0:
            raise PushyError(
                f"expected an earlier sample, got one {-interval:.3f} s later"
            )
        before = {n.node: n for n in earlier.nodes}
        opened = closed = 0
        reconnects: int | None = 0
        for now in self.nodes:
            then = before.get(now.node)
            if then is None:
                continue
            restarted = now.opened < then.opened or now.uptime_s < then.uptime_s
            opened += now.opened - (0 if restarted else then.opened)
            closed += now.closed - (0 if restarted else then.closed)
            if reconnects is None or now.reconnects is None or then.reconnects is None:
                reconnects = None
            else:
                reconnects += now.reconnects - (0 if restarted else then.reconnects)
        return FleetRates(
            interval_s=interval,
            connects_per_s=opened / interval,
            disconnects_per_s=closed / interval,
            reconnects_per_s=None if reconnects is None else reconnects / interval,
        )


def observe(push_urls: Iterable[str], *, timeout: float = 2.0) -> FleetSample:
    """Read every node's ``GET /v1/stats``, one after the other.

    A node that does not answer within ``timeout`` is listed in
    :attr:`FleetSample.unreachable`; it does not make the reading fail (a
    lost node is what an autoscaler must see).

    Args:
        push_urls: the nodes' push API base URLs (``Node.push_url``,
            ``NodeProcess.push_url``).
        timeout: seconds to wait for each node.

    Raises:
        ConfigError: a URL is not an ``http://`` or ``https://`` URL.

    Limitations:
        The nodes are read one at a time, so a reading of a large fleet is
        spread over time. ``drain`` and ``reconnects`` are read only when a
        node reports them, under those names.
    """
    nodes: list[NodeSample] = []
    unreachable: list[str] = []
    for url in push_urls:
        with PushClient(url, timeout=timeout) as client:
            try:
                nodes.append(NodeSample.from_stats(url, client.stats()))
            except PushError:
                unreachable.append(url)
    return FleetSample(time.monotonic(), tuple(nodes), tuple(unreachable))


# The simulator.


@dataclass(frozen=True)
class Backoff:
    """Reconnect backoff of a device that lost its node, with full jitter.

    Attempt ``k`` (from 0) happens at a uniformly random time within
    :meth:`window` ``(k)`` after the loss or the previous refusal.

    Args:
        first_s: window of the first attempt.
        factor: growth of the window after each refusal.
        max_s: largest window.

    Raises:
        ConfigError: a value is out of range.
    """

    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        _require(self.first_s > 0, f"first_s must be positive, got {self.first_s!r}")
        _require(self.factor >= 1, f"factor must be at least 1, got {self.factor!r}")
        _require(
            self.max_s >= self.first_s,
            f"max_s must be at least first_s, got {self.max_s!r}",
        )

    def window(self, attempt: int) -> float:
        """Seconds within which attempt ``attempt`` happens."""
        return min(self.max_s, self.first_s * self.factor**attempt)

    @property
    def levels(self) -> int:
        """Attempts until the window stops growing (the last one repeats)."""
        if self.factor == 1 or self.max_s == self.first_s:
            return 1
        return math.ceil(math.log(self.max_s / self.first_s, self.factor) - 1e-9) + 1

    def horizon(self, attempts: int) -> float:
        """Latest time after the loss of attempt ``attempts - 1``."""
        return sum(self.window(k) for k in range(attempts))


def diurnal(
    peak: float,
    *,
    trough: float = 0.35,
    peak_hour: float = 21.0,
    day_s: float = 86_400.0,
) -> Callable[[float], float]:
    """Return a daily curve of devices online: a cosine from trough to peak.

    Args:
        peak: devices online at ``peak_hour``.
        trough: devices online twelve hours from the peak, as a fraction of
            ``peak``.
        peak_hour: hour of the peak; time 0 is midnight.
        day_s: seconds in a day.

    Raises:
        ConfigError: a value is out of range.
    """
    _require(peak >= 0, f"peak must be at least 0, got {peak!r}")
    _require(0 <= trough <= 1, f"trough must be between 0 and 1, got {trough!r}")
    _require(day_s > 0, f"day_s must be positive, got {day_s!r}")

    def devices(t: float) -> float:
        phase = 2 * math.pi * (t / day_s - peak_hour / 24)
        return peak * (trough + (1 - trough) * (1 + math.cos(phase)) / 2)

    return devices


@dataclass(frozen=True)
class SimNode:
    """A node of a :class:`FleetSimulator`, as it is now.

    Args:
        id: the node's number, in the order nodes were added (from 0).
        state: ``"starting"``, ``"active"``, ``"draining"`` or ``"gone"``.
        connections: connections it holds.
    """

    id: int
    state: str
    connections: float


@dataclass
class SimulationResult:
    """Time series recorded by a :class:`FleetSimulator`, one value per step.

    Rates are per second, averaged over the step. Counts are the model's
    expected values, so they are not whole numbers.

    Args:
        t: the time at the end of each step, seconds from the start.
        devices: devices that want to be online (the demand curve).
        online: devices connected.
        waiting: devices trying to reconnect (in backoff).
        nodes: nodes accepting connections.
        starting: nodes starting.
        draining: nodes draining.
        desired: the policy's last desired node count (NaN without a policy).
        mean_per_node: connections per node holding connections (active and
            draining).
        max_per_node: connections on the fullest node.
        connect_rate: connections accepted per second.
        attempt_rate: connection attempts per second.
        refused_rate: attempts refused per second (accept rate or capacity).
        reconnect_rate: connections ended by the fleet per second (lifetime,
            drain, node loss); those devices reconnect.
        drain_rate: connections ended by drains per second.
        events: ``(time, kind, detail)`` of kills, drains and added nodes.
    """

    t: Any
    devices: Any
    online: Any
    waiting: Any
    nodes: Any
    starting: Any
    draining: Any
    desired: Any
    mean_per_node: Any
    max_per_node: Any
    connect_rate: Any
    attempt_rate: Any
    refused_rate: Any
    reconnect_rate: Any
    drain_rate: Any
    events: list[tuple[float, str, str]]

    def rehome_time(self, after: float, *, tolerance: float = 1.0) -> float:
        """Seconds from ``after`` until fewer than ``tolerance`` devices wait.

        Returns ``math.inf`` when they never do in the recorded steps.
        """
        later = np.flatnonzero((self.t > after) & (self.waiting < tolerance))
        return float(self.t[later[0]] - after) if len(later) else math.inf


_STARTING, _ACTIVE, _DRAINING, _GONE = 0, 1, 2, 3
_STATE_NAMES = ("starting", "active", "draining", "gone")
_SERIES = (
    "t",
    "devices",
    "online",
    "waiting",
    "nodes",
    "starting",
    "draining",
    "desired",
    "mean_per_node",
    "max_per_node",
    "connect_rate",
    "attempt_rate",
    "refused_rate",
    "reconnect_rate",
    "drain_rate",
)


class FleetSimulator:
    """A time-stepped model of a fleet, at the level of counts per node.

    The state is, per node, the connections it holds and a ring of their
    lifetime deadlines in bins of ``bin_s``, and, for the fleet, the devices
    waiting to reconnect by attempt and due step. Every step of ``dt``
    seconds:

    1. events due run (kills, drains, added nodes), starting nodes whose
       ``start_delay_s`` is over start accepting;
    2. the demand curve moves: new devices try to connect, and departing
       devices leave every node and the waiting pool in proportion;
    3. connections whose lifetime ends leave their node (deadlines in a bin
       end evenly over it) and reconnect at once; draining nodes shed their
       connections so that they are empty at the end of ``over_s``;
    4. the attempts due go to the load balancer: ``"least-connections"``
       fills the emptiest accepting nodes first, ``"random"`` splits them
       evenly. A node takes at most ``accept_rate * dt`` and stops at
       ``max_connections``; the refused retry at attempt ``k + 1`` of
       ``reconnect_backoff``. An accepted connection's lifetime is
       ``lifetime_s`` minus a uniform stagger in ``[0, stagger_s]``;
    5. every ``policy_interval_s`` the policy decides: new nodes start (and
       accept after ``start_delay_s``), or the least loaded node drains over
       ``drain_over_s``.

    A killed node's devices retry at once, spread by the backoff's first
    window: the reconnect storm. A simulated day at 200M devices takes a
    few seconds at ``dt=10``.

    Args:
        devices: devices online: a number, or a function of the time (for
            example :func:`diurnal`).
        per_node_target: connections per node for the initial node count;
            the policy's target by default, else 200,000.
        nodes: initial nodes; ``ceil(devices(0) / per_node_target)`` by
            default.
        lifetime_s: connection lifetime before the stagger.
        stagger_s: largest random cut of a lifetime; ``lifetime_s / 10`` by
            default, as the engine does.
        reconnect_backoff: backoff of devices refused or cut off by a kill.
        balancer: ``"least-connections"`` or ``"random"``.
        accept_rate: connections a node accepts per second (no limit when
            ``None``).
        max_connections: connections a node holds at most (no limit when
            ``None``).
        start_delay_s: seconds from adding a node to its accepting.
        drain_over_s: default ``over_s`` of drains, the policy's included.
        policy: a :class:`ScalingPolicy`, or ``None`` for a fixed fleet.
        policy_interval_s: seconds between two decisions.
        dt: step, seconds.
        bin_s: width of a lifetime bin, a multiple of ``dt``;
            ``max(dt, lifetime_s / 180)`` rounded to a multiple of ``dt`` by
            default.
        warm: start in steady state, the devices connected with their
            deadlines spread as after a long time (else they all connect at
            time 0).

    Raises:
        PushyError: numpy is not installed.
        ConfigError: an argument is out of range.

    Limitations:
        It is a mean-field model: counts are expected values, so it shows no
        randomness between nodes (a ``"random"`` balancer splits exactly
        evenly). A lifetime reconnect is modelled as break-then-make in the
        same step, so it never shows as a device offline. The balancer knows
        each node's accept limit, and a device whose node is killed notices
        at once (a lost host would be noticed only at the heartbeat's pong
        timeout). Departing devices leave nodes in proportion to their load.
    """

    def __init__(
        self,
        devices: float | Callable[[float], float],
        *,
        per_node_target: int | None = None,
        nodes: int | None = None,
        lifetime_s: float = 1800.0,
        stagger_s: float | None = None,
        reconnect_backoff: Backoff | None = None,
        balancer: str = "least-connections",
        accept_rate: float | None = None,
        max_connections: float | None = None,
        start_delay_s: float = 60.0,
        drain_over_s: float = 300.0,
        policy: ScalingPolicy | None = None,
        policy_interval_s: float = 60.0,
        dt: float = 1.0,
        bin_s: float | None = None,
        warm: bool = True,
    ) -> None:
        if np is None:
            raise PushyError(
                "the fleet simulator needs numpy; install it with "
                "pip install 'pushy[sim]'"
            )
        if not callable(devices):
            _require(
                isinstance(devices, int | float) and math.isfinite(devices)
                and devices >= 0,
                f"devices must be a number of at least 0 or a function of time, "
                f"got {devices!r}",
            )
        self._demand = devices if callable(devices) else _constant(float(devices))
        if per_node_target is None:
            per_node_target = policy.target_per_node if policy else 200_000
        _require(dt > 0, f"dt must be positive, got {dt!r}")
        _require(lifetime_s > 0, f"lifetime_s must be positive, got {lifetime_s!r}")
        _require(
            per_node_target >= 1,
            f"per_node_target must be at least 1, got {per_node_target!r}",
        )
        stagger = lifetime_s / 10 if stagger_s is None else float(stagger_s)
        spb = max(1, round((bin_s or max(dt, lifetime_s / 180)) / dt))
        self._bin_s = spb * dt
        _require(
            0 <= stagger <= lifetime_s - 2 * self._bin_s,
            f"stagger_s must be from 0 to lifetime_s - 2 * bin_s "
            f"({lifetime_s - 2 * self._bin_s:g}), got {stagger!r}",
        )
        _require(
            balancer in ("least-connections", "random"),
            f"balancer must be 'least-connections' or 'random', got {balancer!r}",
        )
        _require(
            accept_rate is None or accept_rate > 0,
            f"accept_rate must be positive or None, got {accept_rate!r}",
        )
        _require(
            max_connections is None or max_connections > 0,
            f"max_connections must be positive or None, got {max_connections!r}",
        )
        _require(
            start_delay_s >= 0,
            f"start_delay_s must be at least 0, got {start_delay_s!r}",
        )
        _require(
            drain_over_s > 0, f"drain_over_s must be positive, got {drain_over_s!r}"
        )
        _require(
            policy_interval_s >= dt,
            f"policy_interval_s must be at least dt, got {policy_interval_s!r}",
        )
        self.per_node_target = int(per_node_target)
        self.lifetime_s = float(lifetime_s)
        self.stagger_s = stagger
        self.backoff = reconnect_backoff or Backoff()
        self.balancer = balancer
        self.accept_rate = accept_rate
        self.max_connections = max_connections
        self.start_delay_s = float(start_delay_s)
        self.drain_over_s = float(drain_over_s)
        self.policy = policy
        self.dt = float(dt)
        self._spb = spb
        self._policy_steps = max(1, round(policy_interval_s / dt))

        demand0 = max(0.0, float(self._demand(0.0)))
        if nodes is None:
            nodes = max(1, math.ceil(demand0 / self.per_node_target))
        _require(
            nodes >= 1 or (policy is not None and policy.min_nodes >= 1),
            f"nodes must be at least 1 (or a policy that adds some), got {nodes!r}",
        )

        self._bins = math.ceil(self.lifetime_s / self._bin_s) + 3
        capacity = max(16, 2 * nodes)
        self._state = np.full(capacity, _GONE, dtype=np.int8)
        self._count = np.zeros(capacity)
        self._ring = np.zeros((capacity, self._bins))
        self._release = np.zeros(capacity)
        self._ready_at = np.zeros(capacity)
        self._drain_end = np.zeros(capacity)
        self._n = 0
        self._retry_steps = math.ceil(self.backoff.max_s / self.dt) + 2
        self._deadlines = [self._deadline_weights(p) for p in range(spb)]
        self._retry = np.zeros((self.backoff.levels, self._retry_steps))
        self._step = 0
        self._demand_now = demand0
        self._immediate = 0.0
        self._lost = 0.0
        self._desired = math.nan
        self._events: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._event_seq = 0
        self._log: list[tuple[float, str, str]] = []
        self._series: dict[str, list[float]] = {name: [] for name in _SERIES}

        for _ in range(nodes):
            self._state[self._new_node()] = _ACTIVE
        if nodes and demand0:
            if warm:
                self._warm_start(demand0, nodes)
            else:
                self._immediate = demand0
        elif demand0:
            self._immediate = demand0

    # Scenario.

    @property
    def now(self) -> float:
        """Simulated seconds since the start."""
        return self._step * self.dt

    @property
    def nodes(self) -> list[SimNode]:
        """Every node added so far, gone ones included, by id."""
        return [
            SimNode(i, _STATE_NAMES[self._state[i]], float(self._count[i]))
            for i in range(self._n)
        ]

    def add_nodes(self, count: int = 1, *, at: float | None = None) -> None:
        """Add ``count`` nodes at time ``at`` (now by default).

        They accept connections ``start_delay_s`` later.

        Raises:
            ConfigError: ``count`` is below 1.
        """
        _require(count >= 1, f"count must be at least 1, got {count!r}")
        self._schedule(at, "add", (int(count),))

    def kill_node(self, node: int, *, at: float | None = None) -> None:
        """Kill a node at time ``at``: its devices all reconnect, with backoff.

        Raises:
            ConfigError: there is no such node, or it is gone.
        """
        self._check_node(node)
        self._schedule(at, "kill", (node,))

    def drain_node(
        self, node: int, *, over_s: float | None = None, at: float | None = None
    ) -> None:
        """Drain a node from time ``at``: its devices reconnect evenly over ``over_s``.

        The node accepts no connections from then and is gone at the end.

        Raises:
            ConfigError: there is no such node, it is gone, or ``over_s`` is
                not positive.
        """
        self._check_node(node)
        over = self.drain_over_s if over_s is None else float(over_s)
        _require(over > 0, f"over_s must be positive, got {over_s!r}")
        self._schedule(at, "drain", (node, over))

    def run(self, seconds: float) -> SimulationResult:
        """Advance by ``seconds`` (whole steps); return everything recorded.

        Raises:
            ConfigError: ``seconds`` is negative.
        """
        _require(seconds >= 0, f"seconds must be at least 0, got {seconds!r}")
        for _ in range(round(seconds / self.dt)):
            self._advance()
        return self.result()

    def result(self) -> SimulationResult:
        """Return the series recorded since the start."""
        arrays = {name: np.asarray(values) for name, values in self._series.items()}
        return SimulationResult(**arrays, events=list(self._log))

    # Nodes.

    def _new_node(self) -> int:
        i = self._n
        if i == len(self._state):
            grow = len(self._state)
            self._state = np.concatenate((self._state, np.full(grow, _GONE, np.int8)))
            self._ring = np.vstack((self._ring, np.zeros((grow, self._bins))))
            for name in ("_count", "_release", "_ready_at", "_drain_end"):
                setattr(
                    self, name, np.concatenate((getattr(self, name), np.zeros(grow)))
                )
        self._n += 1
        self._state[i] = _STARTING
        self._ready_at[i] = self.now + self.start_delay_s
        return i

    def _check_node(self, node: int) -> None:
        _require(
            0 <= node < self._n and self._state[node] != _GONE,
            f"node must be the id of a node that is not gone, got {node!r}",
        )

    def _schedule(self, at: float | None, kind: str, args: tuple[Any, ...]) -> None:
        when = self.now if at is None else float(at)
        _require(when >= self.now, f"at must not be in the past, got {at!r}")
        heapq.heappush(self._events, (when, self._event_seq, kind, args))
        self._event_seq += 1

    def _run_events(self) -> None:
        while self._events and self._events[0][0] <= self.now + 1e-9:
            _, _, kind, args = heapq.heappop(self._events)
            if kind == "add":
                for _ in range(args[0]):
                    self._new_node()
                self._log.append((self.now, "add", f"{args[0]} nodes"))
            elif self._state[args[0]] == _GONE or (
                kind == "drain" and self._state[args[0]] == _DRAINING
            ):
                self._log.append((self.now, kind, f"node {args[0]} skipped"))
            elif kind == "kill":
                self._kill(args[0])
            else:
                self._drain(args[0], args[1])

    def _kill(self, i: int) -> None:
        lost = self._count[i]
        self._empty(i)
        self._retry_spread(0, lost, self.backoff.window(0), first=0)
        self._lost += lost
        self._log.append((self.now, "kill", f"node {i}, {lost:,.0f} connections"))

    def _drain(self, i: int, over_s: float) -> None:
        self._state[i] = _DRAINING
        self._drain_end[i] = self.now + over_s
        self._log.append(
            (self.now, "drain", f"node {i}, {self._count[i]:,.0f} over {over_s:g} s")
        )

    def _empty(self, i: int) -> None:
        self._state[i] = _GONE
        self._count[i] = 0.0
        self._ring[i] = 0.0
        self._release[i] = 0.0

    def _warm_start(self, demand: float, nodes: int) -> None:
        # Residual lifetimes in steady state: density proportional to
        # P(lifetime > r), 1 up to lifetime - stagger, then falling to 0.
        sub = 64  # samples per bin
        mid = (np.arange(self._bins * sub) + 0.5) * (self._bin_s / sub)
        if self.stagger_s > 0:
            dens = np.clip((self.lifetime_s - mid) / self.stagger_s, 0.0, 1.0)
        else:
            dens = (mid < self.lifetime_s).astype(float)
        weights = dens.reshape(self._bins, sub).sum(axis=1)
        weights /= weights.sum()
        per_node = demand / nodes
        self._ring[:nodes] = per_node * weights
        self._count[:nodes] = per_node

    # One step.

    def _advance(self) -> None:
        dt = self.dt
        self._lost = 0.0
        self._run_events()
        t = self.now
        starting = self._state == _STARTING
        self._state[starting & (self._ready_at <= t + 1e-9)] = _ACTIVE

        # A new lifetime bin: its deadlines end evenly over its steps.
        if self._step % self._spb == 0:
            col = (self._step // self._spb) % self._bins
            self._release = self._ring[:, col] / self._spb
            self._ring[:, col] = 0.0

        # Demand: arrivals connect now; departures leave everything evenly.
        demand = max(0.0, float(self._demand(t + dt)))
        arrivals = demand - self._demand_now
        self._demand_now = demand
        if arrivals < 0:
            held = self._count.sum() + self._retry.sum() + self._immediate
            keep = 1.0 + arrivals / held if held > 0 else 1.0
            for array in (self._count, self._ring, self._release, self._retry):
                array *= keep
            self._immediate *= keep
        fresh = self._immediate + max(arrivals, 0.0)
        self._immediate = 0.0

        # Lifetimes that end, then drains.
        ended = np.minimum(self._release, self._count)
        self._count -= ended
        lifetime = float(ended.sum())
        drained = 0.0
        for i in np.flatnonzero(self._state == _DRAINING):
            left = self._drain_end[i] - t
            share = 1.0 if left <= dt + 1e-9 else dt / left
            moved = self._count[i] * share
            drained += moved
            if share >= 1.0:
                self._empty(i)
                self._log.append((t + dt, "drained", f"node {i}"))
            else:
                self._count[i] -= moved
                self._ring[i] *= 1 - share
                self._release[i] *= 1 - share

        # Attempts due, through the balancer.
        slot = self._step % self._retry_steps
        due = self._retry[:, slot].copy()
        self._retry[:, slot] = 0.0
        due[0] += fresh + lifetime + drained
        attempts = float(due.sum())
        accepted = self._balance(attempts) if attempts > 0 else 0.0
        if attempts > accepted:
            refused_share = 1.0 - accepted / attempts
            for level, amount in enumerate(due):
                if amount > 0:
                    nxt = min(level + 1, self.backoff.levels - 1)
                    self._retry_spread(
                        nxt, amount * refused_share, self.backoff.window(nxt)
                    )

        # The policy.
        if self.policy is not None and self._step % self._policy_steps == 0:
            self._apply_policy(t)

        self._step += 1
        self._record(attempts, accepted, lifetime + drained + self._lost, drained)

    def _balance(self, attempts: float) -> float:
        """Place ``attempts`` on accepting nodes; return how many were accepted."""
        active = np.flatnonzero(self._state == _ACTIVE)
        if len(active) == 0:
            return 0.0
        count = self._count[active]
        cap = np.full(len(active), np.inf)
        if self.accept_rate is not None:
            cap[:] = self.accept_rate * self.dt
        if self.max_connections is not None:
            cap = np.minimum(cap, np.maximum(0.0, self.max_connections - count))
        if self.balancer == "random":
            placed = np.minimum(cap, attempts / len(active))
        else:
            placed = _water_fill(count, cap, attempts)
        self._count[active] += placed
        self._place_deadlines(active, placed)
        return float(placed.sum())

    def _place_deadlines(self, nodes: Any, placed: Any) -> None:
        phase = self._step % self._spb
        first, weights = self._deadlines[phase]
        current = self._step // self._spb
        cols = (current + first + np.arange(len(weights))) % self._bins
        self._ring[np.ix_(nodes, cols)] += placed[:, None] * weights[None, :]

    def _deadline_weights(self, phase: int) -> tuple[int, Any]:
        """Share of a step's new connections whose lifetimes end in each bin.

        A connection made at a uniform time within the step (``phase`` steps
        into its bin) ends ``lifetime_s`` minus a uniform stagger later: the
        end time is the sum of two uniforms, whose CDF is
        ``(R(x - lo) - R(x - lo - dt)) / (dt * stagger_s)`` with ``R`` the
        integral of ``clip(y, 0, stagger_s)``. Returns the first bin, counted
        from the step's own, and the share of each bin from there.
        """
        dt, stagger, b = self.dt, self.stagger_s, self._bin_s
        lo = phase * dt + self.lifetime_s - stagger
        hi = lo + stagger + dt
        first, last = int(lo // b), int(hi // b)
        edges = np.arange(first, last + 2) * b

        def cdf(x: Any) -> Any:
            if stagger == 0:
                return np.clip((x - lo) / dt, 0.0, 1.0)

            def integral(y: Any) -> Any:
                y = np.maximum(y, 0.0)
                inside = np.minimum(y, stagger)
                return inside**2 / 2 + stagger * (y - inside)

            return (integral(x - lo) - integral(x - lo - dt)) / (dt * stagger)

        return first, np.diff(cdf(edges))

    def _retry_spread(
        self, level: int, amount: float, window_s: float, *, first: int = 1
    ) -> None:
        # Attempts spread evenly over window_s seconds (full jitter), from
        # this step (first=0: it has not run its attempts yet) or the next.
        steps = min(self._retry_steps - 1, max(1, round(window_s / self.dt)))
        cols = (self._step + first + np.arange(steps)) % self._retry_steps
        self._retry[level, cols] += amount / steps

    def _apply_policy(self, t: float) -> None:
        assert self.policy is not None
        state = self._state[: self._n]
        serving = int(np.count_nonzero((state == _ACTIVE) | (state == _STARTING)))
        draining = int(np.count_nonzero(state == _DRAINING))
        decision = self.policy.decide(
            serving, float(self._count.sum()), t, draining=draining
        )
        self._desired = decision.desired_nodes
        if decision.delta > 0:
            for _ in range(decision.delta):
                self._new_node()
            self._log.append((t, "add", f"{decision.delta} nodes: {decision.reason}"))
        elif decision.delta < 0:
            active = np.flatnonzero(state == _ACTIVE)
            if len(active):
                self._drain(
                    int(active[np.argmin(self._count[active])]), self.drain_over_s
                )

    def _record(
        self, attempts: float, accepted: float, ended: float, drained: float
    ) -> None:
        dt = self.dt
        state = self._state[: self._n]
        holding = (state == _ACTIVE) | (state == _DRAINING)
        online = float(self._count.sum())
        counts = self._count[: self._n][holding]
        s = self._series
        s["t"].append(self.now)
        s["devices"].append(self._demand_now)
        s["online"].append(online)
        s["waiting"].append(float(self._retry.sum()))
        s["nodes"].append(float(np.count_nonzero(state == _ACTIVE)))
        s["starting"].append(float(np.count_nonzero(state == _STARTING)))
        s["draining"].append(float(np.count_nonzero(state == _DRAINING)))
        s["desired"].append(float(self._desired))
        s["mean_per_node"].append(online / len(counts) if len(counts) else 0.0)
        s["max_per_node"].append(float(counts.max()) if len(counts) else 0.0)
        s["connect_rate"].append(accepted / dt)
        s["attempt_rate"].append(attempts / dt)
        s["refused_rate"].append(max(0.0, attempts - accepted) / dt)
        s["reconnect_rate"].append(ended / dt)
        s["drain_rate"].append(drained / dt)


def _constant(value: float) -> Callable[[float], float]:
    return lambda t: value


def _water_fill(count: Any, cap: Any, amount: float) -> Any:
    """Split ``amount`` so the emptiest nodes fill first, each up to its ``cap``.

    Returns per node ``min(cap, amount, max(0, level - count))`` for the level
    at which the parts add up to ``amount`` (all of ``cap`` when its sum is
    less).
    """
    if amount <= 0:
        return np.zeros(len(count))
    if amount >= cap.sum():
        return cap.copy()
    # g(level) = sum(min(cap, amount, max(0, level - count))) is piecewise
    # linear, with breakpoints at count and top: find where it is amount.
    top = count + np.minimum(cap, amount)
    points = np.concatenate((count, top))
    slopes = np.concatenate((np.ones(len(count)), -np.ones(len(count))))
    order = np.argsort(points, kind="stable")
    points = points[order]
    slope = np.cumsum(slopes[order])[:-1]
    filled = np.concatenate(([0.0], np.cumsum(slope * np.diff(points))))
    # filled[i] < amount <= filled[i + 1]: a rising segment (the last one
    # when rounding left filled[-1] a hair under amount).
    i = min(int(np.searchsorted(filled, amount, side="left")) - 1, len(slope) - 1)
    level = points[i] + (amount - filled[i]) / max(slope[i], 1.0)
    return np.clip(level - count, 0.0, top - count)
