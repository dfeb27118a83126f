"""A site runs only the apps its operator approved: reading a FAB, the review (files, changes, diff), the signed
approvals log, and the verifications Flower's own SuperNode check (``--trusted-entities``) accepts or refuses.
The real SuperNode refusing a tampered app is in tests/test_deploy.py."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.supercore.fab import Fab
from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519
from flwr.supernode.start_client_internal import _verify_fab

from client.supernode import approved_fab
from client.supernode import main as supernode_main
from shared.app_approval import (
    APPROVAL_KEY_FILE,
    APPROVALS_FILE,
    OFFERED_APPS_DIR,
    TRUSTED_ENTITIES_FILE,
    AppApprovalError,
    AppApprovals,
    AppBundle,
    approve_app,
    build_app,
    flower_signature,
    key_id,
    read_app,
    review_app,
)
from shared.cli import main as cli_main
from shared.enrolment import init_site
from tests.conftest import CLIENT, write_app


@pytest.fixture()
def site_dir(tmp_path: Path) -> Path:
    return init_site("hospital-a", tmp_path / "site").site_dir


@pytest.fixture()
def app_dir(tmp_path: Path) -> Path:
    return write_app(tmp_path / "tinyapp")


def _tampered(tmp_path: Path, line: str = "    send(rows)\n") -> Path:
    """The tiny app with one line added to its ClientApp module."""
    return write_app(tmp_path / "tampered" / "tinyapp", client=CLIENT.replace("    return", line + "    return"))


def _flower_accepts(site_dir: Path, fab: Fab) -> bool:
    """Flower 1.41's own SuperNode check: its trusted-entities file loader and its FAB verification."""
    trusted = _try_obtain_trusted_entities(site_dir / TRUSTED_ENTITIES_FILE)
    assert trusted
    _validate_public_keys_ed25519(trusted)
    return bool(fab.verifications.get("valid_license")) and _verify_fab(fab, trusted)


def _fetched(site_dir: Path, content: bytes, sent: dict[str, str] | None = None) -> Fab:
    """The FAB as the site's SuperNode sees it: what the SuperLink sent, through the site's hook."""
    fetch = approved_fab(site_dir, "hospital-a", lambda fab_hash, run_id: Fab("h", content, sent or {}))
    return fetch("h", 7)


# --- reading an app -----------------------------------------------------------------------------------------


def test_an_app_directory_builds_to_the_fab_flwr_run_sends(app_dir, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    built = build_app(app_dir)
    (tmp_path / "tinyapp.fab").write_bytes(built.content)

    assert built.content == build_fab_from_disk(app_dir)  # flwr run's own builder: the same bytes, the same hash
    assert read_app(tmp_path / "tinyapp.fab").sha256 == built.sha256
    assert (built.fab_id, built.version) == ("site-tests/tinyapp", "1.0.0")
    assert sorted(built.files) == ["pyproject.toml", "tinyapp/__init__.py", "tinyapp/client.py", "tinyapp/server.py"]


def _rezip(content: bytes, change) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(content))
    files = {name: source.read(name) for name in source.namelist()}
    change(files)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def test_a_fab_whose_file_is_not_the_one_its_manifest_lists_is_refused(app_dir):
    content = _rezip(build_app(app_dir).content, lambda f: f.update({"tinyapp/client.py": b"send(rows)\n"}))

    with pytest.raises(AppApprovalError, match="tinyapp/client.py does not match its hash in .info/CONTENT"):
        AppBundle.from_bytes(content, where="offered.fab")


def test_a_fab_with_a_file_its_manifest_does_not_list_is_refused(app_dir):
    content = _rezip(build_app(app_dir).content, lambda f: f.update({"tinyapp/extra.py": b"send(rows)\n"}))

    with pytest.raises(AppApprovalError, match=r"files not in its .info/CONTENT: \['tinyapp/extra.py'\]"):
        AppBundle.from_bytes(content, where="offered.fab")


def test_a_file_that_is_not_a_fab_is_refused(tmp_path):
    (tmp_path / "x.fab").write_bytes(b"not a zip")

    with pytest.raises(AppApprovalError, match="x.fab is not a FAB"):
        read_app(tmp_path / "x.fab")
    with pytest.raises(AppApprovalError, match="app not found"):
        read_app(tmp_path / "nothing.fab")


# --- approval and Flower's check ----------------------------------------------------------------------------


def test_first_approval_makes_the_key_records_the_app_and_trusts_only_that_key(site_dir, app_dir):
    review = review_app(site_dir, app_dir)
    assert review.previous is None and review.already is None and review.diff() is None

    approval = approve_app(review)

    assert stat.S_IMODE((site_dir / APPROVAL_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((site_dir / APPROVALS_FILE).stat().st_mode) == 0o600
    (record,) = [json.loads(line) for line in (site_dir / APPROVALS_FILE).read_text().splitlines()]
    assert record["fab_sha256"] == approval.fab_sha256 == review.app.sha256
    assert record["files"]["tinyapp/client.py"] == review.app.file_hashes["tinyapp/client.py"]
    assert record["source"] == str(app_dir) and record["previous_fab_sha256"] is None
    assert (site_dir / "approved-apps" / f"{approval.fab_sha256}.fab").read_bytes() == review.app.content
    trusted = _try_obtain_trusted_entities(site_dir / TRUSTED_ENTITIES_FILE)
    assert list(trusted) == [key_id("hospital-a")] and trusted[key_id("hospital-a")].startswith("ssh-ed25519 ")


def test_flowers_check_accepts_the_approved_app_and_refuses_it_with_one_line_changed(site_dir, app_dir, tmp_path):
    approve_app(review_app(site_dir, app_dir))
    approved = build_app(app_dir).content
    tampered = build_app(_tampered(tmp_path)).content

    assert _flower_accepts(site_dir, _fetched(site_dir, approved))
    assert not _flower_accepts(site_dir, _fetched(site_dir, tampered))
    assert (site_dir / OFFERED_APPS_DIR / f"{AppBundle.from_bytes(tampered, where='t').sha256}.fab").is_file()


def test_a_signature_the_superlink_sends_is_not_used(site_dir, app_dir, tmp_path):
    """Whatever verifications come with the FAB are replaced by the site's own: a coordinator that signs the
    tampered app with a key of its own under the site's key id (or any other) gets nothing."""
    approve_app(review_app(site_dir, app_dir))
    tampered = build_app(_tampered(tmp_path)).content
    forged = {
        "valid_license": "Valid",
        key_id("hospital-a"): json.dumps(
            {"signature": flower_signature(Ed25519PrivateKey.generate(), tampered, 1), "signed_at": 1}
        ),
    }

    fab = _fetched(site_dir, tampered, sent=forged)

    assert key_id("hospital-a") not in fab.verifications
    assert not _flower_accepts(site_dir, fab)


def test_the_refusal_names_the_app_and_the_files_that_differ_from_the_approved_one(site_dir, app_dir, tmp_path):
    approve_app(review_app(site_dir, app_dir))
    tampered = build_app(_tampered(tmp_path))

    reason = AppApprovals.load(site_dir, "hospital-a").refusal(tampered.content)

    assert f"FAB sha256 {tampered.sha256} (site-tests/tinyapp 1.0.0) is not approved by this site's operator" in reason
    assert "it changed tinyapp/client.py" in reason


def test_a_new_version_is_shown_as_files_and_a_diff_against_the_app_approved_last(site_dir, app_dir, tmp_path):
    approve_app(review_app(site_dir, app_dir))
    newer = _tampered(tmp_path, line="    rows = [r for r in rows if r is not None]\n")
    (newer / "tinyapp" / "server.py").unlink()
    (newer / "tinyapp" / "strategy.py").write_text("STEP = 1\n")

    review = review_app(site_dir, newer)
    diff = "".join(review.diff() or [])
    approval = approve_app(review)

    assert review.changes == ["CHANGED tinyapp/client.py", "REMOVED tinyapp/server.py", "ADDED tinyapp/strategy.py"]
    assert "--- approved/tinyapp/client.py\n+++ offered/tinyapp/client.py\n" in diff
    assert "+    rows = [r for r in rows if r is not None]\n" in diff
    assert "removed: tinyapp/server.py" in diff
    assert "--- /dev/null\n+++ offered/tinyapp/strategy.py\n@@ -0,0 +1 @@\n+STEP = 1\n" in diff
    approvals = AppApprovals.load(site_dir, "hospital-a")
    assert [a.fab_sha256 for a in approvals.approvals] == [build_app(app_dir).sha256, approval.fab_sha256]
    assert approval.previous_fab_sha256 == build_app(app_dir).sha256 and approval.changes == review.changes


def test_an_app_approved_before_is_not_recorded_twice(site_dir, app_dir):
    first = approve_app(review_app(site_dir, app_dir))

    review = review_app(site_dir, app_dir)
    again = approve_app(review)

    assert review.already == first == again
    assert len((site_dir / APPROVALS_FILE).read_text().splitlines()) == 1


def test_an_edited_approvals_log_is_refused_and_then_every_app_is(site_dir, app_dir, tmp_path):
    approve_app(review_app(site_dir, app_dir))
    tampered = build_app(_tampered(tmp_path))
    log = site_dir / APPROVALS_FILE
    log.write_text(log.read_text().replace(build_app(app_dir).sha256, tampered.sha256))

    with pytest.raises(AppApprovalError, match="the approvals log does not verify: .*line 1"):
        AppApprovals.load(site_dir, "hospital-a")
    assert not _flower_accepts(site_dir, _fetched(site_dir, tampered.content))
    assert not _flower_accepts(site_dir, _fetched(site_dir, build_app(app_dir).content))


def test_an_approvals_log_without_the_key_is_refused(site_dir, app_dir):
    approve_app(review_app(site_dir, app_dir))
    (site_dir / APPROVAL_KEY_FILE).unlink()

    with pytest.raises(AppApprovalError, match="app-approvals.jsonl exists but .*app_approval_ed25519.pem does not"):
        AppApprovals.load(site_dir, "hospital-a")


def test_an_open_approval_key_is_refused(site_dir, app_dir):
    approve_app(review_app(site_dir, app_dir))
    (site_dir / APPROVAL_KEY_FILE).chmod(0o644)

    with pytest.raises(AppApprovalError, match="app approval key .* has mode 0644; it must be 0600"):
        AppApprovals.load(site_dir, "hospital-a")


# --- the site's SuperNode and the command line --------------------------------------------------------------


def test_the_sites_supernode_does_not_start_before_an_app_is_approved(site_dir, capsys):
    trusted = str(site_dir / TRUSTED_ENTITIES_FILE)

    assert supernode_main(["--site-dir", str(site_dir), "--trusted-entities", trusted, "--insecure"]) == 2
    assert f"no app approved at {site_dir}: privatune site approve-app" in capsys.readouterr().err


def test_the_sites_supernode_does_not_start_without_its_trusted_entities(site_dir, app_dir, capsys):
    approve_app(review_app(site_dir, app_dir))

    assert supernode_main(["--site-dir", str(site_dir), "--insecure"]) == 2
    assert f"give --trusted-entities {site_dir / TRUSTED_ENTITIES_FILE}" in capsys.readouterr().err


def test_cli_approval_needs_the_operator_and_shows_the_diff(site_dir, app_dir, tmp_path, monkeypatch, capsys):
    approve = ["site", "approve-app", "--site-dir", str(site_dir)]
    assert cli_main([*approve, str(app_dir), "--yes"]) == 0
    first = capsys.readouterr().out
    assert "no app was approved at this site before" in first and "  tinyapp/client.py (" in first
    tampered = str(_tampered(tmp_path))

    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli_main([*approve, tampered]) == 2
    assert "approving an app needs its operator" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert cli_main([*approve, tampered]) == 1
    out = capsys.readouterr().out
    assert "  CHANGED tinyapp/client.py" in out and "+    send(rows)\n" in out
    assert len(AppApprovals.load(site_dir, "hospital-a").approvals) == 1

    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert cli_main([*approve, tampered]) == 0
    assert len(AppApprovals.load(site_dir, "hospital-a").approvals) == 2
    assert cli_main([*approve, tampered]) == 0
    assert "this app is already approved" in capsys.readouterr().out
