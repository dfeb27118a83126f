"""``privatune audit`` end to end on a synthetic federation written through the real ledgers.

Each bad input (tampered, truncated, reordered, forked, rolled back or foreign ledger, wrong key, wrong
epsilon, budget overspent) must fail the audit with exit status 1, naming the file, line and kind of problem.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.run_ledger import RunLedger
from shared.audit.cli import audit_main
from shared.audit.example import ExampleFederation, write_example_federation
from shared.hashchain import ChainWriter, canonical_json
from shared.identity import Roster, load_private_key, public_key_hex
from shared.ledger import SITE_LEDGER_KIND, SiteLedger, keyed_fingerprint_rows
from shared.ledger_head import default_head_path
from shared.privacy import DpEvent, compose_epsilon

EVENT = DpEvent(sample_rate=0.02, noise_multiplier=1.0, steps=25, clip_norm=1.0)  # as in the example
FP = keyed_fingerprint_rows([("a review", 1)], key=bytes(32))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("federation")
    write_example_federation(root, accountant="rdp", small_budget=1.7)  # RDP: 2 rounds fit, not 3
    return root


@pytest.fixture
def fed(template, tmp_path) -> ExampleFederation:
    root = tmp_path / "fed"
    shutil.copytree(template, root)
    sim_dir = root / "federation"
    return ExampleFederation(
        sim_dir=sim_dir,
        run_dirs=sorted(root.glob("run-*")),
        site_ids=sorted(Roster.load(sim_dir / "roster.json").keys),
    )


def _audit(fed: ExampleFederation, out: Path, *extra: str, cross_check: bool = False) -> int:
    args = ["--sim-dir", str(fed.sim_dir), "--out", str(out)]
    for d in fed.run_dirs:
        args += ["--run-dir", str(d)]
    if not cross_check:
        args.append("--no-cross-check")
    return audit_main([*args, *extra])


def _rewrite(path: Path, index: int, change) -> None:
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[index])
    change(record)
    lines[index] = canonical_json(record) + "\n"
    path.write_text("".join(lines))


# -- a clean federation


def test_clean_federation_verifies_and_writes_both_reports(fed, tmp_path, capsys):
    status = _audit(fed, tmp_path / "out", cross_check=True)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert status == 0, capsys.readouterr().err
    assert report["verdict"] == "verified" and report["errors"] == 0
    assert (tmp_path / "out" / "report.html").read_text().count('<svg class="plot"') == len(fed.site_ids) + 1


def test_report_json_is_strict_json(fed, tmp_path):
    _audit(fed, tmp_path / "out")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=no_constants)


def test_epsilon_is_recomputed_over_every_run(fed, tmp_path):
    _audit(fed, tmp_path / "out")

    site = json.loads((tmp_path / "out" / "report.json").read_text())["sites"][0]
    (data_set,) = site["data_sources"].values()

    assert data_set["runs"] == ["1000", "1001"] and data_set["rounds"] == 6
    assert data_set["epsilon"] == pytest.approx(compose_epsilon([EVENT] * 6, delta=1e-5, accountant="rdp"))


def test_pld_cross_check_agrees_with_the_recorded_accountant(fed, tmp_path):
    _audit(fed, tmp_path / "out", cross_check=True)

    entries = json.loads((tmp_path / "out" / "report.json").read_text())["sites"][0]["entries"]

    for e in entries:  # RDP is an upper bound on the tighter PLD epsilon (see test_audit_accounting.py)
        assert 0 < e["epsilon_pld"] <= e["epsilon_recomputed"]


def test_the_small_budget_site_declined_and_stayed_within_budget(fed, tmp_path):
    _audit(fed, tmp_path / "out")

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    small = report["sites"][-1]
    declined = [r for run in report["runs"] for r in run["rounds"] if small["site_id"] in r["declined"]]

    assert declined, "the example's small-budget site should decline some rounds"
    assert all("declined:" in r["declined"][small["site_id"]] for r in declined)
    assert max(e["epsilon_recomputed"] for e in small["entries"]) <= small["max_epsilon"]


def test_guarantee_statement_names_epsilon_and_delta_per_site(fed, tmp_path):
    _audit(fed, tmp_path / "out")

    guarantee = json.loads((tmp_path / "out" / "report.json").read_text())["guarantee"]

    for site_id in fed.site_ids:
        assert any(s.startswith(f"{site_id}, data source 'default'") and "delta = 1e-05" in s for s in guarantee)
    assert any("No secure aggregation" in s for s in guarantee)


# -- bad ledgers: exit 1, naming the file, line and problem


def test_tampered_site_entry_fails_naming_the_line(fed, tmp_path, capsys):
    _rewrite(fed.ledger_path("site-0"), 1, lambda r: r.update(epsilon=0.01))

    assert _audit(fed, tmp_path / "out") == 1
    assert "site-0 ledger line 2 [tampered]" in capsys.readouterr().err


def test_truncated_last_line_fails_naming_it(fed, tmp_path, capsys):
    with open(fed.ledger_path("site-1"), "ab") as f:
        f.write(b'{"accountant":"rdp","adap')

    assert _audit(fed, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "site-1 ledger line 7 [truncated]: truncated (25 bytes without a newline)" in err


def test_reordered_entries_fail(fed, tmp_path, capsys):
    path = fed.ledger_path("site-0")
    lines = path.read_text().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_text("".join(lines))

    assert _audit(fed, tmp_path / "out") == 1
    assert "site-0 ledger line 3 [gap]: " in capsys.readouterr().err


def test_a_removed_middle_entry_is_a_gap(fed, tmp_path, capsys):
    path = fed.ledger_path("site-0")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[3:]))

    assert _audit(fed, tmp_path / "out") == 1
    assert "site-0 ledger line 3 [gap]: " in capsys.readouterr().err


def test_a_ledger_cut_back_at_a_line_boundary_is_a_rollback(fed, tmp_path, capsys):
    path = fed.ledger_path("site-0")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))  # a valid, shorter chain

    assert _audit(fed, tmp_path / "out") == 1
    assert "site-0 ledger [rollback]: the server holds site-0's signed entry 4" in capsys.readouterr().err


def test_a_rewritten_history_signed_by_the_site_is_a_fork(fed, tmp_path, capsys):
    path = fed.ledger_path("site-0")
    path.unlink()
    default_head_path(path).unlink()  # whoever holds the site's key can start over, head record included
    ledger = SiteLedger(path, site_id="site-0", signing_key=load_private_key(fed.key_path("site-0")))
    for server_round in (1, 2, 3):  # a new, valid, signed history that differs from what the server holds
        ledger.append(
            run_id="1000",
            server_round=server_round,
            adapter_hash="sha256:other",
            dataset_fingerprint=keyed_fingerprint_rows([("other", 0)], key=bytes(32)),
            event=EVENT,
            delta=1e-5,
            accountant="rdp",
        )

    assert _audit(fed, tmp_path / "out") == 1
    assert "site-0 ledger line 1 [fork]: entry 0 differs from the signed entry 0" in capsys.readouterr().err


def test_another_sites_ledger_in_its_place_is_foreign(fed, tmp_path, capsys):
    shutil.copyfile(fed.ledger_path("site-1"), fed.ledger_path("site-0"))

    assert _audit(fed, tmp_path / "out") == 1
    assert "site-0 ledger line 1 [foreign]: site_id is 'site-1', this ledger belongs to 'site-0'" in (
        capsys.readouterr().err
    )


def test_a_roster_with_another_key_fails_every_signature(fed, tmp_path, capsys):
    roster = json.loads(fed.roster_path.read_text())
    roster["site-0"] = public_key_hex(Ed25519PrivateKey.generate().public_key())
    fed.roster_path.write_text(json.dumps(roster))

    assert _audit(fed, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "site-0 ledger line 1 [signature]: " in err
    assert "[attestation]: round 1: attestation of site-0: " in err


def test_a_signed_entry_with_a_wrong_epsilon_fails_the_recomputation(tmp_path, capsys):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "roster.json").write_text(Roster({"site-a": key.public_key()}).to_json())
    chain = ChainWriter(
        tmp_path / "ledger.jsonl",
        kind=SITE_LEDGER_KIND,
        owner="site-a",
        owner_field="site_id",
        signing_key=key,
    )
    body = {
        "run_id": "r",
        "round": 1,
        "time": "2025-01-01T00:00:00.000Z",
        "site_id": "site-a",
        "adapter_hash": "sha256:00",
        "dataset_fingerprint": "sha256:ab:rows=1",
        "event": EVENT.to_dict(),
        "delta": 1e-5,
        "accountant": "rdp",
        "epsilon": 0.1,  # what buggy (or dishonest) client code might record: far below the real spend
        "max_epsilon": None,
    }
    chain.append(lambda _records: body)

    status = audit_main(
        [
            "--ledger",
            str(tmp_path / "ledger.jsonl"),
            "--site-id",
            "site-a",
            "--roster",
            str(tmp_path / "roster.json"),
        ]
        + ["--out", str(tmp_path / "out"), "--no-cross-check"]
    )

    assert status == 1
    assert (
        "site-a ledger line 1 [epsilon]: entry 0 (run r, round 1, train): recorded epsilon 0.1000 but its 1 events"
        in (capsys.readouterr().err)
    )


def test_an_entry_over_its_recorded_budget_fails(tmp_path, capsys):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "roster.json").write_text(Roster({"site-a": key.public_key()}).to_json())
    ledger = SiteLedger(tmp_path / "ledger.jsonl", site_id="site-a", signing_key=key)
    ledger.append(  # trained although over budget (a client that skipped the check): recorded, then caught
        run_id="r",
        server_round=1,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=EVENT,
        delta=1e-5,
        accountant="rdp",
        max_epsilon=0.1,
    )

    status = audit_main(
        [
            "--ledger",
            str(tmp_path / "ledger.jsonl"),
            "--site-id",
            "site-a",
            "--roster",
            str(tmp_path / "roster.json"),
        ]
        + ["--out", str(tmp_path / "out"), "--no-cross-check"]
    )

    assert status == 1
    assert "[budget]: entry 0 (run r, round 1, train): epsilon" in capsys.readouterr().err


def test_a_tampered_run_ledger_fails(fed, tmp_path, capsys):
    _rewrite(fed.run_dirs[0] / "run_ledger.jsonl", 0, lambda r: r.update(survivors=["site-0"]))

    assert _audit(fed, tmp_path / "out") == 1
    assert "run 1000 ledger line 1 [tampered]" in capsys.readouterr().err


def test_a_forged_attestation_in_the_run_ledger_fails(fed, tmp_path, capsys):
    run_dir = fed.run_dirs[0]
    forged_path = tmp_path / "forged.jsonl"
    records = [json.loads(line) for line in (run_dir / "run_ledger.jsonl").read_text().splitlines()]
    forged = RunLedger(forged_path, "1000")  # no roster: the server does not check what it writes
    for r in records:
        attestations = r["attestations"]
        if r["round"] == 2:
            attestations = {**attestations, "site-0": {**attestations["site-0"], "epsilon": 0.001}}
        forged.record_round(
            r["round"],
            participants=r["participants"],
            declined=r["declined"],
            survivors=r["survivors"],
            dropped=r["dropped"],
            aborted=r["aborted"],
            aggregate_hash=r["aggregate_hash"],
            attestations=attestations,
            metrics=r["metrics"],
        )
    shutil.copyfile(forged_path, run_dir / "run_ledger.jsonl")

    assert _audit(fed, tmp_path / "out") == 1
    assert "run 1000 ledger line 2 [attestation]: round 2: attestation of site-0: " in capsys.readouterr().err


def test_a_run_ledger_of_another_run_is_foreign(fed, tmp_path, capsys):
    metrics = json.loads((fed.run_dirs[0] / "metrics.json").read_text())
    metrics["run_id"] = "999"
    (fed.run_dirs[0] / "metrics.json").write_text(json.dumps(metrics))

    assert _audit(fed, tmp_path / "out") == 1
    assert "run 999 ledger line 1 [foreign]: run_id is '1000', this ledger belongs to '999'" in (
        capsys.readouterr().err
    )


def test_the_report_is_written_even_when_the_audit_fails(fed, tmp_path):
    _rewrite(fed.ledger_path("site-0"), 1, lambda r: r.update(epsilon=0.01))

    _audit(fed, tmp_path / "out")

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verdict"] == "FAILED"
    assert {"subject": "site-0 ledger", "kind": "tampered", "line": 2}.items() <= report["findings"][0].items()
    assert "FAILED" in (tmp_path / "out" / "report.html").read_text()


def test_the_ledgers_are_never_rewritten_by_the_audit(fed, tmp_path):
    with open(fed.ledger_path("site-1"), "ab") as f:
        f.write(b'{"trunc')
    before = {p: p.read_bytes() for p in fed.sim_dir.rglob("*.jsonl")}

    _audit(fed, tmp_path / "out")

    assert {p: p.read_bytes() for p in fed.sim_dir.rglob("*.jsonl")} == before


# -- unusable arguments: exit 2 with a message


def test_missing_roster_is_a_usage_error(tmp_path, capsys):
    status = audit_main(["--ledger", "x.jsonl", "--site-id", "a", "--roster", str(tmp_path / "no.json"), "--out", "o"])

    assert status == 2
    assert "privatune audit: error: roster not found" in capsys.readouterr().err


def test_ledger_without_site_id_is_a_usage_error(fed, tmp_path, capsys):
    status = audit_main(["--ledger", "x.jsonl", "--roster", str(fed.roster_path), "--out", str(tmp_path)])

    assert status == 2
    assert "give one --site-id per --ledger, got 1 and 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("site-0=abc", "--budget must be [SITE=]EPSILON, got 'site-0=abc'"),
        ("-1", "--budget must be > 0, got '-1'"),
        ("site-9=1", "--budget names site 'site-9', which is not audited"),
    ],
)
def test_bad_budget_is_a_usage_error(fed, tmp_path, capsys, budget, message):
    assert _audit(fed, tmp_path / "out", "--budget", budget) == 2
    assert message in capsys.readouterr().err


def test_a_budget_given_on_the_command_line_is_checked(tmp_path, capsys):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "roster.json").write_text(Roster({"site-a": key.public_key()}).to_json())
    ledger = SiteLedger(tmp_path / "ledger.jsonl", site_id="site-a", signing_key=key)
    ledger.append(
        run_id="r",
        server_round=1,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=EVENT,
        delta=1e-5,
        accountant="rdp",
    )
    args = [
        "--ledger",
        str(tmp_path / "ledger.jsonl"),
        "--site-id",
        "site-a",
        "--roster",
        str(tmp_path / "roster.json"),
    ]

    assert audit_main([*args, "--out", str(tmp_path / "a"), "--no-cross-check", "--budget", "100"]) == 0
    assert audit_main([*args, "--out", str(tmp_path / "b"), "--no-cross-check", "--budget", "site-a=0.1"]) == 1
    assert "over the site's budget max_epsilon=0.1" in capsys.readouterr().err


def test_rounds_with_seeded_noise_are_flagged_in_the_guarantee(tmp_path, capsys):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "roster.json").write_text(Roster({"site-a": key.public_key()}).to_json())
    ledger = SiteLedger(tmp_path / "ledger.jsonl", site_id="site-a", signing_key=key)
    ledger.append(
        run_id="r",
        server_round=1,
        adapter_hash="sha256:00",
        dataset_fingerprint=FP,
        event=EVENT,
        delta=1e-5,
        accountant="rdp",
        seeded_noise=True,
    )
    args = [
        "--ledger",
        str(tmp_path / "ledger.jsonl"),
        "--site-id",
        "site-a",
        "--roster",
        str(tmp_path / "roster.json"),
    ]

    status = audit_main([*args, "--out", str(tmp_path / "out"), "--no-cross-check"])

    guarantee = json.loads((tmp_path / "out" / "report.json").read_text())["guarantee"]
    assert status == 0  # a warning: the run was honest about it
    assert "WARNING site-a ledger line 1 [seeded-noise]" in capsys.readouterr().err
    assert any("1 of its rounds drew their DP noise and sampling from the run's seed" in s for s in guarantee)


# -- what a privacy officer reads: budget, rounds, summary, configuration, canary, quality, rounded numbers


def _page_and_report(fed: ExampleFederation, out: Path, *extra: str) -> tuple[str, dict]:
    assert _audit(fed, out, *extra) == 0
    return (out / "report.html").read_text(), json.loads((out / "report.json").read_text())


def _svg_of(page: str, site_id: str) -> str:
    start = page.index(f"<h2>Site {site_id}</h2>")
    return page[page.index("<svg", start) : page.index("</svg>", start)]


def _edit_metrics(fed: ExampleFederation, change) -> None:
    for run_dir in fed.run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        change(metrics)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_the_budget_a_site_set_is_a_red_line_on_its_epsilon_plot(fed, tmp_path):
    page, report = _page_and_report(fed, tmp_path / "out")

    small = _svg_of(page, "site-2")
    assert "budget: max-epsilon = 1.7" in small and 'stroke="#b00020"' in small
    assert "Budget: max-epsilon = 1.7 (from the site&#x27;s ledger)" in page
    assert report["sites"][-1]["budget"] == {"status": "set", "max_epsilon": 1.7, "from": "the site's ledger"}


def test_a_site_without_a_budget_says_none_set_and_shows_the_runs_target_instead(fed, tmp_path):
    _edit_metrics(fed, lambda m: m["config"].update({"dp": True, "target-epsilon": 8.0, "noise-multiplier": 0.0}))

    page, report = _page_and_report(fed, tmp_path / "out")

    plot = _svg_of(page, "site-0")
    assert "run target-epsilon = 8 (planned; this site set no budget)" in plot and "#b00020" not in plot
    assert "Budget: none set (the site&#x27;s config has no max-epsilon" in page
    assert "not recorded" not in page.split("<h2>Model quality</h2>")[0]
    assert report["sites"][0]["budget"]["status"] == "none"


def test_the_epsilon_plot_counts_rounds_of_each_run_not_ledger_entries(fed, tmp_path):
    page, _ = _page_and_report(fed, tmp_path / "out")

    plot = _svg_of(page, "site-0")  # 6 entries: rounds 1-3 of run 1000, then rounds 1-3 of run 1001
    ticks = re.findall(r'text-anchor="middle" font-size="11"[^>]*>([^<]+)</text>', plot)
    assert ticks == ["1", "2", "3", "1", "2", "3"]
    assert "round (of each of the 2 runs" in plot and "ledger entry" not in plot
    assert ">run 1000<" in plot and ">run 1001<" in plot


def test_the_summary_table_gives_every_site_in_one_place(fed, tmp_path):
    page, report = _page_and_report(fed, tmp_path / "out")

    rows = {r["site_id"]: r for r in report["summary"]}
    assert rows["site-2"]["budget_status"] == "set" and rows["site-2"]["declined_rounds"] == 4
    assert rows["site-2"]["budget_used"] == pytest.approx(rows["site-2"]["epsilon"] / 1.7)
    assert rows["site-0"]["budget_status"] == "none" and rows["site-0"]["releases"] == 6
    summary = page[page.index("Every site at a glance") : page.index("The guarantee, in plain words")]
    assert summary.count("<tr>") == 1 + len(fed.site_ids)
    assert f"1.7 ({100 * rows['site-2']['epsilon'] / 1.7:.3g}% used)" in summary and "none set" in summary


def test_each_run_shows_its_configuration_f1_and_majority_baseline(fed, tmp_path):
    def change(m):
        m["config"].update({"num-server-rounds": 3, "learning-rate": 0.3333333333333333})
        m["majority_baseline"] = 0.5416666666666666

    _edit_metrics(fed, change)
    page, report = _page_and_report(fed, tmp_path / "out")

    run = page[page.index("<h2>Run 1000</h2>") : page.index("<h2>Run 1001</h2>")]
    assert "<h3>Run configuration</h3>" in run and "<td>num-server-rounds</td><td>3</td>" in run
    assert "<td>learning-rate</td><td>0.3333</td>" in run
    assert "test macro-F1" in run and "Majority-class baseline (always predicting the most frequent label): " in run
    assert "accuracy 0.5417." in run
    assert "majority-class baseline 0.542" in page  # the line on the accuracy plot
    assert report["runs"][0]["majority_baseline"] == pytest.approx(0.5416666666666666)
    assert 'stroke-dasharray="6 3"' in page.split("<h2>Model quality</h2>")[1]  # macro-F1, dashed


def test_a_run_without_a_recorded_majority_baseline_says_so(fed, tmp_path):
    page, report = _page_and_report(fed, tmp_path / "out")

    assert report["runs"][0]["majority_baseline"] is None
    assert "Majority-class baseline (always predicting the most frequent label): not recorded." in page


def test_whether_a_canary_audit_ran_is_stated_per_run(fed, tmp_path):
    _edit_metrics(fed, lambda m: m["config"].update({"canaries": 0}))
    config = json.loads((fed.run_dirs[0] / "metrics.json").read_text())
    config["config"]["canaries"] = 50
    (fed.run_dirs[0] / "metrics.json").write_text(json.dumps(config))
    rows = [{"site": "site-0", "included": i % 2 == 0, "score": float(i % 7)} for i in range(60)]
    (fed.run_dirs[1] / "canary_scores.json").write_text(json.dumps({"canaries": rows}))

    page, report = _page_and_report(fed, tmp_path / "out")

    assert [r["canary_audit"] for r in report["runs"]] == [
        "NOT RUN: the run config asked for 50 canaries, but the run left no canary_scores.json",
        "ran: 60 canaries (canary_scores.json)",
    ]
    assert "Empirical canary audit: NOT RUN: the run config asked for 50 canaries" in page
    assert "Empirical audit (canaries, one run)" in page


def test_numbers_are_rounded_on_the_page_and_on_stdout(fed, tmp_path, capsys):
    def change(m):
        m["rounds"][0]["test"]["accuracy"] = 0.3333333333333333

    _edit_metrics(fed, change)
    capsys.readouterr()

    page, _ = _page_and_report(fed, tmp_path / "out")

    out = capsys.readouterr().out
    long_float = re.compile(r"\d\.\d{6,}")
    assert not long_float.search(page), long_float.search(page)
    assert not long_float.search(out), out
    assert "| epsilon 2.046 at delta 1e-05" in out and "| budget none set" in out
    assert "| budget max-epsilon 1.7, 95% used" in out


def test_library_warnings_go_to_stderr_once_not_to_stdout(fed, tmp_path, capsys, monkeypatch):
    import warnings

    from shared.audit import cli

    real = cli.audit_site_ledger

    def noisy(*args, **kwargs):
        warnings.warn("Optimal order is the largest alpha.", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "audit_site_ledger", noisy)
    capsys.readouterr()

    assert _audit(fed, tmp_path / "out") == 0

    captured = capsys.readouterr()
    assert "Optimal order" not in captured.out
    assert captured.err.count("note from a library: UserWarning: Optimal order is the largest alpha.") == 1
