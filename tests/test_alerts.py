"""The alert rules (server/alerts.yml) evaluated by ``promtool test rules`` against recorded metrics.

The input series are not written by hand: a :class:`RunMonitor` and a :class:`ServeMetrics` are driven through
a scenario (rounds, a site nearing its budget, dropouts, an aborted round, a silent ServerApp; a service whose
server errors rise) and their exposition is scraped once a minute, as Prometheus would. So the rules are tested
against the metric names and labels the exporters really produce.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.monitoring import RunMonitor
from server.serving.app import ENDPOINTS, PREDICT_PATH
from server.serving.metrics import ServeMetrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "server" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)
FED = {"job": "privatune-server", "instance": "coordinator:9100"}
SERVE = {"job": "privatune-serve", "instance": "inference:9101"}
ALL_SITES = ["site-0", "site-1", "site-2", "site-3"]


class Recorder:
    """Scrapes registries once per step (1m) into promtool ``input_series`` (``_``: not yet present)."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        self.steps = 0

    def scrape(self, sources: list[tuple[CollectorRegistry, dict[str, str]]]) -> None:
        for registry, target in sources:
            for family in text_string_to_metric_families(generate_latest(registry).decode()):
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    labels = {**sample.labels, **target}
                    series = sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                    column = self.values.setdefault(series, ["_"] * self.steps)
                    column.append(repr(float(sample.value)))
        self.steps += 1
        for column in self.values.values():
            column.extend(["_"] * (self.steps - len(column)))

    def input_series(self) -> list[dict[str, str]]:
        return [{"series": s, "values": " ".join(v)} for s, v in sorted(self.values.items())]


def attestation(site: str, epsilon: float, budget: float) -> dict[str, Any]:
    entry = {"site_id": site, "epsilon": epsilon, "max_epsilon": budget}
    return {"site_id": site, "epsilon": epsilon, "entry": json.dumps(entry)}


def round_record(n: int, *, epsilons: dict[str, float], dropped: list[str], aborted: bool = False) -> dict[str, Any]:
    survivors = [] if aborted else [s for s in ALL_SITES if s not in dropped]
    return {
        "round": n,
        "participants": ALL_SITES,
        "survivors": survivors,
        "dropped": dropped,
        "declined": {},
        "aborted": aborted,
        "secure_aggregation": True,
        "attestations": {s: attestation(s, e, 8.0) for s, e in epsilons.items()},
    }


def federation_scenario(recorder: Recorder) -> None:
    """Minute 1: round 0; 2: round 1; 4: round 2 (site-0 at 7.3 of 8, 1 of 4 dropped); 6: round 3 aborts (2 of 4
    dropped); 8: round 4 (no drop-outs); then silence to minute 45."""
    minute = [0.0]
    monitor = RunMonitor("run-1", clock=lambda: minute[0] * 60.0)
    rounds = {
        1: round_record(0, epsilons={"site-0": 0.2, "site-1": 0.2}, dropped=[]),
        2: round_record(1, epsilons={"site-0": 4.0, "site-1": 4.0}, dropped=[]),
        4: round_record(2, epsilons={"site-0": 7.3, "site-1": 5.0}, dropped=["site-3"]),
        6: round_record(3, epsilons={}, dropped=["site-2", "site-3"], aborted=True),
        8: round_record(4, epsilons={"site-0": 7.4, "site-1": 5.5}, dropped=[]),
    }
    for m in range(46):
        minute[0] = float(m)
        if m in rounds:
            monitor.record_round(rounds[m], seconds=30.0)
        recorder.scrape([(monitor.registry, FED)])


def serving_scenario(recorder: Recorder) -> None:
    """Minutes 0-10: 100 good requests a minute and 50 refused (401); from minute 11: 80 good and 20 server errors."""
    metrics = ServeMetrics(endpoints=ENDPOINTS, labels=("rotten", "fresh"))
    for m in range(31):
        batches = [(200, 100), (401, 50)] if m <= 10 else [(200, 80), (500, 20)]
        for status, count in batches:
            for _ in range(count):
                metrics.observe(endpoint=PREDICT_PATH, status=status, seconds=0.02, texts=1 if status == 200 else 0)
        recorder.scrape([(metrics.registry, SERVE)])


def expected(alertname: str, **labels: str) -> dict[str, Any]:
    """An expected alert: its rule's labels and annotations rendered for ``labels`` (``{{ $labels.x }}``)."""
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r["alert"] == alertname)

    def render(text: str) -> str:
        return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], text)

    return {
        "exp_labels": {**labels, **rule.get("labels", {})},
        "exp_annotations": {k: render(v) for k, v in rule.get("annotations", {}).items()},
    }


def at(minute: int, alertname: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": f"{minute}m", "alertname": alertname, "exp_alerts": list(alerts)}


def federation_test() -> dict[str, Any]:
    recorder = Recorder()
    federation_scenario(recorder)
    site0 = {**FED, "site": "site-0"}
    return {
        "interval": "1m",
        "input_series": recorder.input_series(),
        "alert_rule_test": [
            at(3, "PrivatuneSiteNearBudget"),  # 4.0 of 8: plenty left
            at(5, "PrivatuneSiteNearBudget", expected("PrivatuneSiteNearBudget", **site0)),  # 7.3 of 8
            at(45, "PrivatuneSiteNearBudget", expected("PrivatuneSiteNearBudget", **site0)),
            at(3, "PrivatuneDropoutsHigh"),
            at(5, "PrivatuneDropoutsHigh", expected("PrivatuneDropoutsHigh", **FED)),  # 1 of 4 > 20%
            at(7, "PrivatuneDropoutsHigh", expected("PrivatuneDropoutsHigh", **FED)),
            at(9, "PrivatuneDropoutsHigh"),  # round 4: none dropped
            at(5, "PrivatuneRoundAborted"),
            at(7, "PrivatuneRoundAborted", expected("PrivatuneRoundAborted", **FED)),
            at(20, "PrivatuneRoundAborted", expected("PrivatuneRoundAborted", **FED)),
            at(25, "PrivatuneRoundAborted"),  # 15 minutes without another abort
            at(30, "PrivatuneRoundStuck"),  # 22 minutes since round 4
            at(40, "PrivatuneRoundStuck", expected("PrivatuneRoundStuck", **FED)),  # 32 minutes
        ],
    }


def serving_test() -> dict[str, Any]:
    recorder = Recorder()
    serving_scenario(recorder)
    return {
        "interval": "1m",
        "input_series": recorder.input_series(),
        "alert_rule_test": [
            at(10, "PrivatuneServeErrorRate"),  # a third refused with 401: refusals are not errors
            at(14, "PrivatuneServeErrorRate"),  # 20% server errors, but not yet for 5 minutes
            at(25, "PrivatuneServeErrorRate", expected("PrivatuneServeErrorRate", **SERVE)),
        ],
    }


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_the_rules_file_is_valid():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


@needs_promtool
@pytest.mark.parametrize("make", [federation_test, serving_test], ids=["federation", "serving"])
def test_alerts_fire_when_and_only_when_they_should_on_recorded_metrics(tmp_path, make):
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [make()]}))
    done = promtool("test", "rules", str(test_file))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_would_catch_a_rule_that_does_not_fire(tmp_path):
    """The harness can fail: the same recording, with a threshold no site reaches, misses the expected alert."""
    rules = tmp_path / "alerts.yml"
    rules.write_text(
        RULES.read_text().replace("<= 0.1 * privatune_site_max_epsilon", "<= 0.01 * privatune_site_max_epsilon")
    )
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(
        json.dumps({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [federation_test()]})
    )
    done = promtool("test", "rules", str(test_file))
    assert done.returncode != 0 and "PrivatuneSiteNearBudget" in done.stdout + done.stderr


def test_every_metric_the_rules_read_is_exported():
    exported: set[str] = set()
    for make in (federation_scenario, serving_scenario):
        recorder = Recorder()
        make(recorder)
        exported |= {s.split("{")[0] for s in recorder.values}
    read = set(re.findall(r"privatune_[a-z_]+", RULES.read_text()))
    assert read and read <= exported, sorted(read - exported)
