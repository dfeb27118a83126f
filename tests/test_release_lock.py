"""Item 5 of issue 21: two runs at one site must not both pass its budget check.

The site checks its budget before training and records the round in its ledger after. Two runs asking the same
site at once, through the real train handler, at a site whose remaining budget covers one round: each check
used to see the history without the other's round, so both trained. Exactly one may.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from shared import constants as C
from shared.config import BUILTIN_DATA
from shared.identity import IDENTITY_KEY_FILE, write_private_key
from shared.ledger import SiteLedger
from shared.model import build_model, get_trainable
from shared.privacy import compose_epsilon
from shared.records import record_from_arrays
from tests.conftest import make_rows

SITE = "hospital-a"
DELTA = 1e-5


@pytest.fixture()
def cfg(tiny_config):
    """Fixed noise (no calibration), no centering round, one local step: one cheap DP event per round. A
    deployed site's run config names no data path or sim dir of its own."""
    return replace(
        tiny_config,
        noise_multiplier=1.0,
        target_epsilon=0.0,
        center_features=False,
        local_steps=1,
        data_path=BUILTIN_DATA,
        sim_dir="",
    )


def _node_config(tmp_path: Path, max_epsilon: float) -> dict:
    site_dir = tmp_path / SITE
    if not (site_dir / IDENTITY_KEY_FILE).exists():
        write_private_key(site_dir / IDENTITY_KEY_FILE, Ed25519PrivateKey.generate())
        (site_dir / "notes.csv").write_text(
            "text,label\n" + "".join(f'"{t}",{label}\n' for t, label in make_rows(32, seed=5))
        )
    return {
        "site-id": SITE,
        "site-dir": str(site_dir),
        "data-path": str(site_dir / "notes.csv"),
        "max-epsilon": max_epsilon,
        "delta": DELTA,
        "accountant": "prv",
        "labels": "rotten,fresh",
    }


def _context(cfg, node_config: dict, run_id: int) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())


def _message(cfg, run_id: int, server_round: int) -> Message:
    content = RecordDict(
        {
            C.GLOBAL_RECORD: record_from_arrays(get_trainable(build_model(cfg, 2))),
            C.TRAIN_CONFIG_RECORD: ConfigRecord({C.KEY_SERVER_ROUND: server_round, C.KEY_RUN_ID: str(run_id)}),
        }
    )
    return Message(content, dst_node_id=7, message_type="train")


def _declined(reply: Message) -> str | None:
    record = reply.content.config_records.get(C.DECLINE_RECORD)
    return None if record is None else str(record["reason"])


def _ledger(tmp_path: Path) -> SiteLedger:
    return SiteLedger(tmp_path / SITE / "privacy_ledger.jsonl", site_id=SITE)


@pytest.mark.slow  # three rounds through the site's train handler
def test_two_concurrent_runs_at_a_site_with_budget_for_one_round_train_only_one(cfg, tmp_path, monkeypatch):
    # Prepare: one round already spent; the budget then covers exactly one more round of the same cost
    first = client_app.train(_message(cfg, 1, 1), _context(cfg, _node_config(tmp_path, 1000.0), 1))
    assert _declined(first) is None, _declined(first)
    (spent,) = _ledger(tmp_path).entries()
    two, three = (compose_epsilon([spent.event] * n, delta=DELTA, accountant="prv") for n in (2, 3))
    node_config = _node_config(tmp_path, (two + three) / 2)
    # Each budget decision waits until the other run has decided too, or has answered without deciding: the two
    # checks overlap whenever the site lets them
    decided = threading.Event()
    calls: list[int] = []
    real_decide = client_app.decide

    def decide_side_by_side(*args, **kwargs):
        decision = real_decide(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            decided.wait(timeout=120)
        else:
            decided.set()
        return decision

    monkeypatch.setattr(client_app, "decide", decide_side_by_side)
    replies: dict[int, Message] = {}

    def run(run_id: int) -> None:
        try:
            replies[run_id] = client_app.train(_message(cfg, run_id, 1), _context(cfg, node_config, run_id))
        finally:
            decided.set()

    # Execute: runs 2 and 3 ask for their round 1 at the same time
    threads = [threading.Thread(target=run, args=(run_id,)) for run_id in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    # Assert: one trained, the other declined and says why; the ledger holds the one round, within budget
    reasons = {run_id: _declined(reply) for run_id, reply in replies.items()}
    assert sorted(reasons) == [2, 3]
    trained = [run_id for run_id, reason in reasons.items() if reason is None]
    assert len(trained) == 1, reasons
    (declined,) = [reason for reason in reasons.values() if reason is not None]
    assert declined.startswith(f"site {SITE}: another release of data source 'default' is in progress"), declined
    assert f"run {trained[0]}" not in declined  # the other run is named in the site's log only
    entries = _ledger(tmp_path).entries()
    assert [(e.run_id, e.round) for e in entries] == [("1", 1), (str(trained[0]), 1)]
    assert entries[-1].epsilon <= node_config["max-epsilon"]


# -- the lock itself --------------------------------------------------------------------------------------------


def test_a_site_process_that_dies_between_its_budget_check_and_its_record_leaves_the_source_free(tmp_path):
    import signal
    import subprocess
    import sys

    from client.release_lock import ReleaseInProgress, exclusive_release

    ledger = tmp_path / "privacy_ledger.jsonl"
    holder = subprocess.Popen(  # holds the lock, as a handler does between its budget check and its ledger entry
        [
            sys.executable,
            "-c",
            "import sys, time; from client.release_lock import exclusive_release\n"
            f"with exclusive_release({str(ledger)!r}, 'default', holder='run 8, round 3, train'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(ReleaseInProgress, match=r"data source 'default' is in progress at this site;") as busy,
            exclusive_release(ledger, "default", holder="run 9, round 1, train"),
        ):
            pass
        assert busy.value.holder.startswith("run 8, round 3, train, pid ")  # for the site's log
        assert "run 8" not in str(busy.value)  # what the declined run's server reads names no other run
        with exclusive_release(ledger, "other-source", holder="run 9, round 1, train"):
            pass  # another data source is not held up
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: nothing was recorded, nothing left the site
        holder.wait(timeout=30)

    with exclusive_release(ledger, "default", holder="run 9, round 1, train"):
        assert not ledger.exists()  # the lock came back with the process's death; no ledger entry was written


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("default", "privacy_ledger.release-default.lock"),
        ("notes/2024 ../x", "privacy_ledger.release-9cc9cb62bd6e29f9.lock"),
    ],
)
def test_each_data_source_has_its_own_lock_file_beside_the_ledger(tmp_path, source, name):
    from client.release_lock import lock_path

    path = lock_path(tmp_path / "privacy_ledger.jsonl", source)

    assert path.parent == tmp_path and path.name.startswith(name) and path.name.endswith(".lock")
