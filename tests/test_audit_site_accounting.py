"""The audit holds every entry to the site's own delta and accountant, and composes per data source.

Issue 10, items 3 and 4: a ledger whose later entries were accounted at a run config's looser delta used to
verify ("recomputed at the delta recorded in each entry"); a data change under one budget went unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.audit.cli import audit_main
from shared.audit.verify import audit_site_ledger
from shared.identity import Roster
from shared.ledger import SiteLedger, keyed_fingerprint_rows
from shared.privacy import DpEvent, compose_epsilon
from tests.test_ledger import write_legacy_ledger

EVENT = DpEvent(sample_rate=0.02, noise_multiplier=1.0, steps=25, clip_norm=1.0)
FP = keyed_fingerprint_rows([("a review", 1)], key=bytes(32))
EDITED = keyed_fingerprint_rows([("a review!", 1)], key=bytes(32))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _ledger(path: Path, key, entries) -> Path:
    ledger = SiteLedger(path, site_id="site-a", signing_key=key)
    for n, kw in enumerate(entries, start=1):
        args = dict(
            run_id=f"run-{n}",
            server_round=1,
            adapter_hash="sha256:00",
            dataset_fingerprint=FP,
            event=EVENT,
            delta=1e-5,
            accountant="prv",
        )
        ledger.append(**{**args, **kw})
    return path


def _findings(audit, kind):
    return [f for f in audit.findings if f.kind == kind]


def test_entries_repriced_at_a_looser_delta_are_errors_against_the_ledgers_first_entry(tmp_path, key):
    path = _ledger(tmp_path / "l.jsonl", key, [{}, {"delta": 0.5}, {"delta": 0.5, "accountant": "rdp"}])

    audit = audit_site_ledger(path, site_id="site-a", public_key=key.public_key())

    repriced = _findings(audit, "repriced")
    assert [f.line for f in repriced] == [2, 3] and all(f.severity == "error" for f in repriced)
    assert "accounted at delta=0.5 (prv), but the site's is delta=1e-05 (prv, from the ledger's first entry)" in (
        repriced[0].message
    )
    assert not audit.ok and not _findings(audit, "epsilon")  # each recorded number matches its own delta...
    three = compose_epsilon([EVENT] * 3, delta=1e-5, accountant="prv")
    assert audit.sources["default"].epsilon == pytest.approx(three)  # ...but the site's spend is this


def test_the_sites_own_delta_is_taken_from_its_configuration_when_given(tmp_path, key):
    path = _ledger(tmp_path / "l.jsonl", key, [{"delta": 0.5}, {"delta": 0.5}])

    audit = audit_site_ledger(
        path,
        site_id="site-a",
        public_key=key.public_key(),
        site_delta=1e-5,
        site_accountant="prv",
        settings_from="node config /srv/a.toml",
    )

    assert [f.line for f in _findings(audit, "repriced")] == [1, 2]
    assert "from node config /srv/a.toml" in _findings(audit, "repriced")[0].message
    assert audit.accounting is not None and audit.accounting.source == "node config /srv/a.toml"


def test_the_budget_is_checked_at_the_sites_delta(tmp_path, key):
    budget = compose_epsilon([EVENT] * 3, delta=1e-5, accountant="prv") / 2
    assert compose_epsilon([EVENT] * 3, delta=0.5, accountant="prv") < budget  # within it at the looser delta
    path = _ledger(tmp_path / "l.jsonl", key, [{"delta": 0.5, "max_epsilon": budget}] * 3)

    audit = audit_site_ledger(
        path, site_id="site-a", public_key=key.public_key(), site_delta=1e-5, site_accountant="prv"
    )

    assert _findings(audit, "budget"), "at the site's delta the three rounds are over the budget"


def test_several_fingerprints_under_one_source_are_a_warning_naming_the_entries(tmp_path, key):
    path = _ledger(tmp_path / "l.jsonl", key, [{}, {}, {"dataset_fingerprint": EDITED}])

    audit = audit_site_ledger(path, site_id="site-a", public_key=key.public_key())

    (finding,) = _findings(audit, "fingerprints")
    assert finding.severity == "warning" and audit.ok
    assert "data source 'default' holds 2 fingerprints (entries 0-1: hmac-sha256:" in finding.message
    assert "; entries 2: hmac-sha256:" in finding.message
    assert audit.sources["default"].epsilon == pytest.approx(compose_epsilon([EVENT] * 3, delta=1e-5))


def test_epsilon_is_recomputed_per_data_source(tmp_path, key):
    path = _ledger(tmp_path / "l.jsonl", key, [{}, {"data_source": "registry"}, {}])

    audit = audit_site_ledger(path, site_id="site-a", public_key=key.public_key())

    assert audit.ok and set(audit.sources) == {"default", "registry"}
    assert audit.sources["default"].rounds == 2 and audit.sources["registry"].rounds == 1
    assert audit.sources["registry"].epsilon == pytest.approx(compose_epsilon([EVENT], delta=1e-5))


def test_a_legacy_ledger_still_audits_and_counts_toward_the_new_entries_source(tmp_path, key):
    path = write_legacy_ledger(tmp_path / "l.jsonl", key)
    legacy_only = audit_site_ledger(path, site_id="site-0", public_key=key.public_key())
    assert legacy_only.ok and [f.kind for f in legacy_only.findings] == ["adopted"]  # a warning: adopted once
    assert [c.entry.release for c in legacy_only.checks] == ["feature-mean", "train"]

    SiteLedger(path, site_id="site-0", signing_key=key).append(
        run_id="run-new",
        server_round=1,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=DpEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20, clip_norm=1.0),
        delta=1e-5,
        accountant="rdp",
    )
    audit = audit_site_ledger(path, site_id="site-0", public_key=key.public_key())

    assert audit.ok and not _findings(audit, "epsilon")
    (finding,) = _findings(audit, "fingerprints")
    assert "predate keyed ones" in finding.message


def test_the_cli_reads_a_simulated_sites_site_toml_and_a_deployed_node_config(tmp_path, key, capsys):
    (tmp_path / "roster.json").write_text(Roster({"site-a": key.public_key()}).to_json())
    path = _ledger(tmp_path / "l.jsonl", key, [{"delta": 0.5}])
    node = tmp_path / "node-config.toml"
    node.write_text('site-id = "site-a"\ndelta = 1e-5\naccountant = "prv"\n')
    args = ["--ledger", str(path), "--site-id", "site-a", "--roster", str(tmp_path / "roster.json"), "--no-cross-check"]

    assert audit_main([*args, "--out", str(tmp_path / "a")]) == 0  # alone, the ledger's first entry is the site's
    assert audit_main([*args, "--out", str(tmp_path / "b"), "--node-config", str(node)]) == 1

    err = capsys.readouterr().err
    assert (
        f"[repriced]: entry 0 (run run-1, round 1, train) is accounted at delta=0.5 (prv), but the site's is "
        f"delta=1e-05 (prv, from node config {node})" in err
    )
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["sites"][0]["data_sources"]["default"]["accounting_from"] == f"node config {node}"


def test_a_node_config_without_delta_is_a_usage_error(tmp_path, key, capsys):
    (tmp_path / "roster.json").write_text(Roster({"site-a": key.public_key()}).to_json())
    path = _ledger(tmp_path / "l.jsonl", key, [{}])
    node = tmp_path / "node-config.toml"
    node.write_text('site-id = "site-a"\naccountant = "prv"\n')

    status = audit_main(
        [
            "--ledger",
            str(path),
            "--site-id",
            "site-a",
            "--roster",
            str(tmp_path / "roster.json"),
            "--node-config",
            str(node),
            "--out",
            str(tmp_path / "o"),
        ]
    )

    assert status == 2 and "does not set 'delta' (a deployed site must)" in capsys.readouterr().err
