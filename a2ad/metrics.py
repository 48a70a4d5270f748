"""Prometheus metrics: event counters and latencies, plus gauges read from the registry.

Each Metrics owns its CollectorRegistry: several apps may run in one process
(tests, embedding), and the global default registry would mix them up.
Labels are workspace ids and fixed sets only, never item ids, so the number
of series stays bounded by the number of workspaces. Only counters and gauges
carry the workspace: a histogram is 17 series a label set, and a box with
10,000 workspaces would have a2ad and Prometheus keep millions of them; the
latency histograms are by outcome, for all workspaces together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .upstream import Outcome
from .workspaces import Registry, State

# Agents answer in milliseconds (a bare proxy) up to minutes (a model at work).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Items wait from nothing (a slot frees at once) up to max_age_seconds (a day).
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class WorkspaceMetrics:
    """One workspace's labelled children, bound once: the hot path only calls them
    (the histograms are shared by every workspace)."""

    __slots__ = ("busy", "delivered", "delivery", "enqueued", "expired", "failed", "proxy", "wait")

    def __init__(self, metrics: Metrics, workspace_id: str) -> None:
        self.enqueued = metrics.enqueued.labels(workspace_id)
        self.delivered = metrics.delivered.labels(workspace_id)
        self.failed = metrics.failed.labels(workspace_id)
        self.expired = metrics.expired.labels(workspace_id)
        self.busy = metrics.busy.labels(workspace_id)
        self.wait = metrics.queue_wait
        self.delivery = metrics.delivery_by_outcome
        self.proxy = metrics.proxy_by_outcome


class Metrics:
    """a2ad's metrics in a registry of its own; `render` is the /metrics body."""

    def __init__(self, workspaces: Registry, *, replica: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ws = ["workspace"]
        self.enqueued = Counter("a2ad_enqueued", "Items queued (new rows only).", ws, registry=r)
        self.delivered = Counter(
            "a2ad_delivered", "Queued items delivered (the agent's answer stored).", ws, registry=r
        )
        self.failed = Counter(
            "a2ad_failed", "Queued items that ended failed (attempts spent).", ws, registry=r
        )
        self.expired = Counter(
            "a2ad_expired", "Queued items that expired before delivery.", ws, registry=r
        )
        self.busy = Counter(
            "a2ad_busy_answers",
            "Busy answers from agents (503, 429, refused), direct and queued.",
            ws,
            registry=r,
        )
        self.queue_wait = Histogram(
            "a2ad_queue_wait_seconds",
            "From enqueue to the start of the delivery that settled the item.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.delivery = Histogram(
            "a2ad_delivery_seconds",
            "Queued path: each delivery attempt, by how the agent answered.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.proxy = Histogram(
            "a2ad_proxy_seconds",
            "Direct path: until the agent's answer (its headers, for a stream).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        push = Counter(
            "a2ad_pushes",
            "Push notification POSTs to callers' webhooks: sent, failed attempts, and"
            " updates that became dead letters.",
            ["outcome"],
            registry=r,
        )
        self.pushes = {o: push.labels(o) for o in ("sent", "failed", "dead")}
        self.push_delay = Histogram(
            "a2ad_push_delay_seconds",
            "From the change a push tells of (a delivery's answer …) to the receiver's 2xx.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_by_outcome = {o: self.delivery.labels(o.value) for o in Outcome}
        self.proxy_by_outcome = {o: self.proxy.labels(o.value) for o in Outcome}
        self.collector = _RegistryCollector(workspaces, replica)
        r.register(self.collector)
        r.register(_OutboxCollector(self))
        self.outbox: dict[str, int] = {}  # pending and dead rows, as last counted
        self._by_workspace: dict[str, WorkspaceMetrics] = {}

    def of(self, workspace_id: str) -> WorkspaceMetrics:
        """The workspace's bound children (made on first use, then a dict lookup)."""
        found = self._by_workspace.get(workspace_id)
        if found is None:
            found = self._by_workspace[workspace_id] = WorkspaceMetrics(self, workspace_id)
        return found

    def forget(self, workspace_id: str) -> None:
        """A removed workspace's series go too, so removals do not pile up series."""
        if self._by_workspace.pop(workspace_id, None) is None:
            return
        for metric in (self.enqueued, self.delivered, self.failed, self.expired, self.busy):
            metric.remove(workspace_id)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics when asked for)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _RegistryCollector(Collector):
    """Gauges read at scrape time from the counts the registry keeps in memory:
    no store query per scrape and nothing to keep in step on the hot path."""

    def __init__(self, workspaces: Registry, replica: str | None) -> None:
        self._workspaces = workspaces
        # Replicas: which one this is, and the duties it holds now.
        self._replica = replica
        self.duties: Callable[[], set[str]] = set

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "a2ad_queue_depth", "Items waiting, by state.", labels=["workspace", "state"]
        )
        mine = [] if self._replica is None else [self._replica]
        in_flight = GaugeMetricFamily(
            "a2ad_in_flight",
            "a2ad's own message requests at the agent, direct or queued"
            + ("." if self._replica is None else ", from this replica."),
            labels=["workspace", *(["replica"] if mine else [])],
        )
        state = GaugeMetricFamily(
            "a2ad_workspace_state",
            "1 for the workspace's current liveness state, 0 for the others.",
            labels=["workspace", "state"],
        )
        restarts = CounterMetricFamily(
            "a2ad_restarts", "Restarts of the agent by a2ad.", labels=["workspace"]
        )
        for ws in self._workspaces:
            depth.add_metric([ws.id, "queued"], ws.queued_total)
            depth.add_metric([ws.id, "dispatching"], ws.dispatching)
            in_flight.add_metric([ws.id, *mine], ws.in_flight)
            for s in State:
                state.add_metric([ws.id, s.value], 1 if ws.state is s else 0)
            restarts.add_metric([ws.id], ws.restarts)
        yield from (depth, in_flight, state, restarts)
        if self._replica is not None:
            info = GaugeMetricFamily(
                "a2ad_replica", "1: this replica, by its store.replica_id.", labels=["replica"]
            )
            info.add_metric(mine, 1)
            duties = GaugeMetricFamily(
                "a2ad_duty_held",
                "1 for each duty this replica holds (an agent's probes and restarts, the sweeps).",
                labels=["replica", "duty"],
            )
            for duty in sorted(self.duties()):
                duties.add_metric([*mine, duty], 1)
            yield from (info, duties)


class _OutboxCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        outbox = GaugeMetricFamily(
            "a2ad_push_outbox",
            "Push updates not yet sent (pending) and dead letters, counted every 10 s.",
            labels=["status"],
        )
        for status in ("pending", "dead"):
            outbox.add_metric([status], self._metrics.outbox.get(status, 0))
        yield outbox
