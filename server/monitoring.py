"""Prometheus metrics of a running federation, from the ServerApp, on an opt-in port (``metrics-port``).

The ServerApp hands :meth:`RunMonitor.record_round` each round's run-ledger record once it is written, so
everything exported is what the run ledger holds: the round, who was sampled, survived, dropped out or
declined, whether the round aborted, and each site's epsilon from its signed attestation (already verified
against the roster when the record was written), with the budget the site recorded in that attested entry.
Nothing else about a site is exported; the alert rules in ``server/alerts.yml`` read these names.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

logger = logging.getLogger("privatune")

METRICS_HOST = "127.0.0.1"  # loopback: a Prometheus on the coordinator's host scrapes it (docs/serving.md)
SITE_STATES = ("sampled", "survived", "dropped", "declined")


class MetricsEndpoint:
    """A registry served over HTTP (prometheus-client's own server, a daemon thread) until :meth:`close`."""

    def __init__(self, registry: CollectorRegistry, *, port: int, host: str = METRICS_HOST) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"metrics port must be in 0..65535 (0: any free port), got {port!r}")
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from e
        self.host, self.port = host, int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def _number(value: Any) -> float | None:
    """A finite or infinite float from an attested value, or None (missing, or not a number)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _attested_budget(attestation: Mapping[str, Any]) -> float | None:
    """The ``max_epsilon`` the site recorded in the attested (signed) ledger entry, if it recorded one."""
    try:
        entry = json.loads(str(attestation.get("entry", "")))
    except json.JSONDecodeError:
        return None
    return _number(entry.get("max_epsilon")) if isinstance(entry, dict) else None


class RunMonitor:
    """The run's metrics in their own registry; served on ``port`` when it is not 0."""

    def __init__(
        self, run_id: str, *, port: int = 0, host: str = METRICS_HOST, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        r = self.registry
        Gauge("privatune_run_info", "The run being monitored.", ["run_id"], registry=r).labels(run_id=run_id).set(1)
        self.round = Gauge("privatune_round", "The last round recorded in the run ledger (0: centering).", registry=r)
        self.round_seconds = Gauge("privatune_round_seconds", "Seconds the last recorded round took.", registry=r)
        self.round_time = Gauge(
            "privatune_round_completed_timestamp_seconds",
            "Unix time the last round was recorded (the run's start until then).",
            registry=r,
        )
        self.round_sites = Gauge(
            "privatune_round_sites", "Sites of the last recorded round, by state.", ["state"], registry=r
        )
        self.sites_total = Counter("privatune_sites", "Sites over all rounds, by state.", ["state"], registry=r)
        self.rounds_total = Counter("privatune_rounds", "Rounds recorded.", registry=r)
        self.aborted_total = Counter("privatune_rounds_aborted", "Rounds that aborted (no aggregate).", registry=r)
        self.secagg_aborts = Counter("privatune_secagg_aborts", "Rounds whose secure aggregation aborted.", registry=r)
        self.round_aborted = Gauge("privatune_round_aborted", "1 if the last recorded round aborted.", registry=r)
        self.site_epsilon = Gauge(
            "privatune_site_epsilon", "A site's cumulative epsilon, from its last attestation.", ["site"], registry=r
        )
        self.site_budget = Gauge(
            "privatune_site_max_epsilon",
            "A site's budget as recorded in its last attested ledger entry (+Inf: none).",
            ["site"],
            registry=r,
        )
        self.site_remaining = Gauge(
            "privatune_site_remaining_epsilon", "A site's budget minus its cumulative epsilon.", ["site"], registry=r
        )
        for state in SITE_STATES:  # every series exists from the start, so rate() and increase() see the first one
            self.round_sites.labels(state=state).set(0)
            self.sites_total.labels(state=state)
        self.round_time.set(self._clock())
        self.endpoint = MetricsEndpoint(self.registry, port=port, host=host) if port else None
        if self.endpoint is not None:
            logger.info("run metrics (Prometheus) on http://%s:%d/metrics", self.endpoint.host, self.endpoint.port)

    def record_round(self, record: Mapping[str, Any], *, seconds: float) -> None:
        """Export one round's run-ledger record (the dict :meth:`RunLedger.record_round` wrote)."""
        counts = {
            "sampled": len(record.get("participants", [])),
            "survived": len(record.get("survivors", [])),
            "dropped": len(record.get("dropped", [])),
            "declined": len(record.get("declined", {})),
        }
        for state, count in counts.items():
            self.round_sites.labels(state=state).set(count)
            self.sites_total.labels(state=state).inc(count)
        self.round.set(int(record["round"]))
        self.round_seconds.set(float(seconds))
        self.round_time.set(self._clock())
        self.rounds_total.inc()
        aborted = bool(record.get("aborted"))
        self.round_aborted.set(1 if aborted else 0)
        if aborted:
            self.aborted_total.inc()
            if record.get("secure_aggregation"):
                self.secagg_aborts.inc()
        for site, attestation in (record.get("attestations") or {}).items():
            epsilon = _number(attestation.get("epsilon"))
            if epsilon is None:
                continue
            self.site_epsilon.labels(site=site).set(epsilon)
            budget = _attested_budget(attestation)
            if budget is not None:
                self.site_budget.labels(site=site).set(budget)
                remaining = math.inf if budget == math.inf else budget - epsilon  # no budget: nothing runs out
                self.site_remaining.labels(site=site).set(remaining)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
