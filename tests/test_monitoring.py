"""The ServerApp's Prometheus metrics (server/monitoring.py): what a round's run-ledger record exports."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.monitoring import SITE_STATES, MetricsEndpoint, RunMonitor


def attestation(site: str, epsilon: float, max_epsilon: float | None) -> dict:
    """A site's attestation as the run ledger stores it: flat fields plus the signed entry as JSON."""
    entry = {"site_id": site, "round": 1, "epsilon": epsilon, "max_epsilon": max_epsilon, "signature": "..."}
    return {"site_id": site, "round": 1, "epsilon": epsilon, "entry": json.dumps(entry)}


def ledger_record(server_round: int = 1, **kw) -> dict:
    record = {
        "round": server_round,
        "participants": ["site-0", "site-1", "site-2", "site-3"],
        "survivors": ["site-0", "site-1"],
        "dropped": ["site-2"],
        "declined": {"site-3": "budget spent"},
        "aborted": False,
        "secure_aggregation": True,
        "attestations": {"site-0": attestation("site-0", 7.5, 8.0), "site-1": attestation("site-1", 2.0, None)},
    }
    return {**record, **kw}


def samples(monitor: RunMonitor) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(monitor.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_round_record_exports_round_sites_and_attested_budgets():
    monitor = RunMonitor("77")

    monitor.record_round(ledger_record(), seconds=12.5)

    got = samples(monitor)
    assert got[("privatune_round", ())] == 1 and got[("privatune_round_seconds", ())] == 12.5
    states = {s: got[("privatune_round_sites", (("state", s),))] for s in SITE_STATES}
    assert states == {"sampled": 4, "survived": 2, "dropped": 1, "declined": 1}
    assert got[("privatune_site_epsilon", (("site", "site-0"),))] == 7.5
    assert got[("privatune_site_max_epsilon", (("site", "site-0"),))] == 8.0
    assert got[("privatune_site_remaining_epsilon", (("site", "site-0"),))] == pytest.approx(0.5)
    assert got[("privatune_site_epsilon", (("site", "site-1"),))] == 2.0
    assert ("privatune_site_remaining_epsilon", (("site", "site-1"),)) not in got  # no budget recorded: unknown
    assert got[("privatune_run_info", (("run_id", "77"),))] == 1
    assert got[("privatune_rounds_aborted_total", ())] == 0


def test_an_aborted_secure_round_counts_as_a_secagg_abort_and_totals_add_up():
    monitor = RunMonitor("77")
    monitor.record_round(ledger_record(1), seconds=1.0)

    monitor.record_round(ledger_record(2, aborted=True, survivors=[], attestations={}), seconds=2.0)

    got = samples(monitor)
    assert got[("privatune_round_aborted", ())] == 1
    assert got[("privatune_rounds_aborted_total", ())] == 1 and got[("privatune_secagg_aborts_total", ())] == 1
    assert got[("privatune_sites_total", (("state", "sampled"),))] == 8
    assert got[("privatune_rounds_total", ())] == 2
    assert got[("privatune_site_epsilon", (("site", "site-0"),))] == 7.5  # the last known value stays


def test_a_site_without_a_budget_has_infinite_room_not_nan():
    monitor = RunMonitor("77")
    monitor.record_round(ledger_record(attestations={"site-0": attestation("site-0", math.inf, math.inf)}), seconds=1.0)
    got = samples(monitor)
    assert got[("privatune_site_remaining_epsilon", (("site", "site-0"),))] == math.inf


def test_unreadable_attested_values_are_skipped_not_guessed():
    bad = {"site_id": "site-0", "epsilon": "lots", "entry": "{"}
    monitor = RunMonitor("77")
    monitor.record_round(ledger_record(attestations={"site-0": bad}), seconds=1.0)
    assert not any(name.startswith("privatune_site_") for name, _ in samples(monitor))


def test_metrics_are_served_over_http_on_the_port_and_the_port_is_freed_on_close():
    monitor = RunMonitor("77", port=_free_port())
    port = monitor.endpoint.port
    monitor.record_round(ledger_record(), seconds=3.0)

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    monitor.close()

    assert 'privatune_site_epsilon{site="site-0"} 7.5' in text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)


def test_a_port_in_use_is_a_clear_error():
    from prometheus_client import CollectorRegistry

    endpoint = MetricsEndpoint(CollectorRegistry(), port=0)
    try:
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{endpoint.port}"):
            RunMonitor("77", port=endpoint.port)
    finally:
        endpoint.close()


def test_port_zero_serves_nothing():
    monitor = RunMonitor("77", port=0)
    assert monitor.endpoint is None
    monitor.close()


def test_a_bad_port_is_refused():
    from prometheus_client import CollectorRegistry

    with pytest.raises(ValueError, match="metrics port must be in 0..65535"):
        MetricsEndpoint(CollectorRegistry(), port=70000)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.integration
def test_a_simulated_run_serves_its_metrics_while_it_runs(tiny_config):
    """The ServerApp hook: scraped during a real 3-site run (Flower's simulation runtime, Ray)."""
    from shared.simulation import run_simulation
    from tests.conftest import simulation_overrides

    port = _free_port()
    scrapes: list[str] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):  # not up yet, or already closed
                scrapes.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0).text)
            time.sleep(0.1)

    poller = threading.Thread(target=scrape, daemon=True)
    poller.start()
    try:
        run_simulation(simulation_overrides(tiny_config, **{"metrics-port": port}), num_clients=3)
    finally:
        stop.set()
        poller.join()
    rounds = [
        s.value
        for text in scrapes
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "privatune_round"
    ]
    assert rounds and max(rounds) >= 1  # round 0 (centering) and round 1 were exported during the run
    last = next(text for text in reversed(scrapes) if 'privatune_site_epsilon{site="site-2"}' in text)
    assert 'privatune_round_sites{state="survived"} 3.0' in last
    with pytest.raises(httpx.ConnectError):  # closed when the run ended
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)


def test_a_run_resumes_with_another_metrics_port_or_from_a_checkpoint_made_before_the_key_existed():
    import numpy as np

    from server.checkpoint import Checkpoint, check_resumable
    from shared.config import RunConfig

    config = RunConfig(num_server_rounds=4).to_flower()
    arrays = {"a": np.ones(2, np.float32)}
    older = {k: v for k, v in config.items() if k != "metrics-port"}
    rng = np.random.default_rng(0).bit_generator.state
    for saved in (config, older):
        ckpt = Checkpoint(
            run_id="101",
            lineage=[],
            server_round=2,
            config=saved,
            rng_state=rng,
            history={"rounds": []},
            run_ledger_head=None,
            arrays=arrays,
        )
        check_resumable(ckpt, {**config, "metrics-port": 9100}, dict(arrays))  # monitoring changes nothing
