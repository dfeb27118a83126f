"""A site runs only the app its operator approved: the approval of a FAB, its record, and the check that uses it.

The coordinator ships the code every site runs: Flower's SuperLink hands each SuperNode the run's app bundle
(FAB), and the site's ClientApp is that bundle's code. So a site approves apps the way it approves the roster
(``shared/enrolment.py``): ``privatune site approve-app --site-dir DIR SOURCE`` reads the FAB (a ``.fab`` file,
or an app directory built exactly as ``flwr run`` builds it: Flower's own ``build_fab_from_disk``, whose zip is
byte-for-byte reproducible), shows its files and what changed against the app approved last (the files added,
removed and changed, and a unified diff of each), and once the operator agrees, records the approval::

    DIR/app_approval_ed25519.pem      the site's approval key (Ed25519, made at the first approval)      0600
    DIR/app-approvals.jsonl           one signed, hash-chained record per approved app                  0600
    DIR/approved-apps/<sha256>.fab    a copy of each approved FAB (what the next diff is made against)  0600
    DIR/trusted-entities.yaml         the approval key's public half, as flower-supernode takes it

Each record carries a **Flower FAB verification** made by the approval key: the Ed25519 signature Flower's
SuperNode checks with ``--trusted-entities`` (over ``signed_at`` as 8 big-endian bytes, then the SHA-256 of the
FAB; ``flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign``). Flower's SuperNode checks the
verifications that come with the FAB from the SuperLink, and a self-hosted SuperLink (``flower-superlink``
1.41) sends none for an app started with ``flwr run``: it attaches verifications only to apps it downloads from
Flower's platform, and ignores any in the run request. So the site's SuperNode (``client/supernode.py``) takes
the verifications from this site's own records instead (:meth:`AppApprovals.verifications`), and Flower's own
check then admits exactly the FABs this site approved, before any line of one runs.
"""

from __future__ import annotations

import base64
import datetime
import difflib
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.hashchain import ChainError, ChainWriter, read_chain, write_atomic
from shared.identity import IdentityError, load_private_key, write_private_key

APPROVAL_KEY_FILE = "app_approval_ed25519.pem"
APPROVALS_FILE = "app-approvals.jsonl"
APPROVED_APPS_DIR = "approved-apps"
OFFERED_APPS_DIR = "offered-apps"  # FABs the site's SuperNode refused, kept for the operator to review
TRUSTED_ENTITIES_FILE = "trusted-entities.yaml"
APPROVE_APP_COMMAND = "privatune site approve-app"
CHAIN_KIND = "privatune-app-approvals"
FAB_MANIFEST = ".info/CONTENT"  # Flower's list of a FAB's files: "path,sha256,size in bits" per line
MAX_APP_BYTES = 64 * 1024 * 1024  # uncompressed; Flower caps the FAB itself at 10 MB (PrivaTune's: ~1 MB)
MAX_OFFERED_APPS = 8
# Flower's SuperNode refuses a FAB without a "valid_license" verification before it checks any signature: it
# stands for the licence check of Flower's platform, which a self-hosted federation has no part in.
LICENSE_VERIFICATION = "valid_license"
LICENSE_VALUE = "privatune: checked against this site's app approvals"


class AppApprovalError(ValueError):
    """An app bundle, the approvals log or the approval key is missing, malformed or inconsistent."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AppBundle:
    """A FAB, read and checked: its bytes, its files (from its manifest) and Flower's id and version of it."""

    content: bytes
    files: dict[str, bytes]  # path -> content, every file but the manifest
    fab_id: str  # "<publisher>/<name>", as Flower names it
    version: str

    @property
    def sha256(self) -> str:
        return sha256_hex(self.content)

    @property
    def file_hashes(self) -> dict[str, str]:
        return {path: sha256_hex(data) for path, data in self.files.items()}

    def describe(self) -> str:
        return f"{self.fab_id} {self.version}, {len(self.files)} files, FAB sha256 {self.sha256}"

    @classmethod
    def from_bytes(cls, content: bytes, *, where: str) -> AppBundle:
        """Read a FAB's files and check them against its manifest: every file listed, with its hash and size,
        and nothing else (what Flower's ``install_from_fab`` checks before it installs one)."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(content))
            infos = archive.infolist()
        except (zipfile.BadZipFile, ValueError) as e:
            raise AppApprovalError(f"{where} is not a FAB (a zip archive): {e}") from e
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise AppApprovalError(f"{where} holds a file name twice: not a FAB flwr build makes")
        if sum(info.file_size for info in infos) > MAX_APP_BYTES:
            raise AppApprovalError(f"{where} unpacks to more than {MAX_APP_BYTES} bytes")
        if FAB_MANIFEST not in names or "pyproject.toml" not in names:
            raise AppApprovalError(f"{where} lacks {FAB_MANIFEST} or pyproject.toml: not a FAB flwr build makes")
        for name in names:
            if name.startswith("/") or ".." in Path(name).parts or name.endswith("/"):
                raise AppApprovalError(f"{where} holds the path {name!r}: not a FAB flwr build makes")
        try:
            files = {name: archive.read(name) for name in names if name != FAB_MANIFEST}
            manifest = archive.read(FAB_MANIFEST).decode("utf-8")
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
            raise AppApprovalError(f"{where} cannot be read: {e}") from e
        listed: dict[str, tuple[str, int]] = {}
        for line in manifest.splitlines():
            path, digest, size = (line.rsplit(",", 2) + ["", ""])[:3]
            if not size.isdigit() or path in listed:
                raise AppApprovalError(f"{where}: {FAB_MANIFEST} line {line!r} is not 'path,sha256,bits'")
            listed[path] = (digest, int(size))
        if set(listed) != set(files):
            extra, missing = sorted(set(files) - set(listed)), sorted(set(listed) - set(files))
            raise AppApprovalError(f"{where}: files not in its {FAB_MANIFEST}: {extra}; listed but absent: {missing}")
        for path, (digest, bits) in listed.items():
            if (sha256_hex(files[path]), len(files[path]) * 8) != (digest, bits):
                raise AppApprovalError(f"{where}: {path} does not match its hash in {FAB_MANIFEST}")
        from flwr.common.config import get_fab_config, get_metadata_from_config

        try:
            fab_id, version = get_metadata_from_config(get_fab_config(content))
        except (KeyError, TypeError, ValueError) as e:
            raise AppApprovalError(f"{where}: its pyproject.toml does not name the app and its version: {e}") from e
        return cls(content=content, files=files, fab_id=fab_id, version=str(version))


def build_app(app_dir: Path) -> AppBundle:
    """The FAB ``flwr run`` would send from ``app_dir``: Flower's own builder (same files, same bytes, same hash)."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir).expanduser().resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise AppApprovalError(f"{app_dir} is not a Flower app directory (no pyproject.toml)")
    try:
        content = build_fab_from_disk(app_dir)
    except ValueError as e:
        raise AppApprovalError(f"flwr build of {app_dir} failed: {e}") from e
    return AppBundle.from_bytes(content, where=str(app_dir))


def read_app(source: Path) -> AppBundle:
    """A FAB from a ``.fab`` file, or built from an app directory (:func:`build_app`)."""
    source = Path(source).expanduser().resolve()
    if source.is_dir():
        return build_app(source)
    if not source.is_file():
        raise AppApprovalError(f"app not found: {source} (give a .fab file or an app directory)")
    return AppBundle.from_bytes(source.read_bytes(), where=str(source))


def file_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """``ADDED``/``REMOVED``/``CHANGED <path>`` between two apps' ``{path: sha256}``, by path."""
    out = []
    for path in sorted(set(before) | set(after)):
        if path not in after:
            out.append(f"REMOVED {path}")
        elif path not in before:
            out.append(f"ADDED {path}")
        elif before[path] != after[path]:
            out.append(f"CHANGED {path}")
    return out


def _lines(data: bytes) -> list[str] | None:
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def unified_diff(before: AppBundle, after: AppBundle) -> list[str]:
    """Every line that differs, file by file (an added file in full; a removed one by name)."""
    out: list[str] = []
    for change in file_changes(before.file_hashes, after.file_hashes):
        kind, path = change.split(" ", 1)
        if kind == "REMOVED":
            out.append(f"removed: {path}\n")
            continue
        old = _lines(before.files.get(path, b""))
        new = _lines(after.files[path])
        if old is None or new is None:
            out.append(f"binary file {path} differs\n")
            continue
        fromfile = "/dev/null" if kind == "ADDED" else f"approved/{path}"
        diff = list(difflib.unified_diff(old, new, fromfile=fromfile, tofile=f"offered/{path}"))
        out.extend(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in diff)
    return out


# --- the site's approval key and Flower's verification ------------------------------------------------------


def _approval_key_path(site_dir: Path) -> Path:
    return Path(site_dir) / APPROVAL_KEY_FILE


def load_approval_key(site_dir: Path) -> Ed25519PrivateKey:
    from shared.provision import ProvisionError, check_private_key_file

    path = _approval_key_path(site_dir)
    try:
        return load_private_key(check_private_key_file(path, what="app approval key"))
    except (IdentityError, ProvisionError) as e:
        raise AppApprovalError(f"app approval key: {e}") from e


def _approval_key(site_dir: Path) -> Ed25519PrivateKey:
    """The site's approval key, made (0600) at the first approval."""
    if not _approval_key_path(site_dir).exists():
        write_private_key(_approval_key_path(site_dir), Ed25519PrivateKey.generate())
    return load_approval_key(site_dir)


def key_id(site_id: str) -> str:
    """The approval key's name in ``--trusted-entities`` and in a FAB's verifications."""
    return f"{site_id}-app-approval"


def openssh_public_key(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _message_to_sign(fab_content: bytes, signed_at: int) -> bytes:
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    return create_message_to_sign(hashlib.sha256(fab_content).digest(), signed_at)


def flower_signature(key: Ed25519PrivateKey, fab_content: bytes, signed_at: int) -> str:
    """The signature Flower's SuperNode verifies for a trusted entity (base64url, no padding)."""
    signature = key.sign(_message_to_sign(fab_content, signed_at))
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _flower_signature_valid(key: Ed25519PublicKey, fab_sha256: str, signed_at: int, signature: str) -> bool:
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, decode_base64url

    try:
        key.verify(decode_base64url(signature), create_message_to_sign(bytes.fromhex(fab_sha256), signed_at))
    except (InvalidSignature, ValueError, TypeError, OverflowError):
        return False
    return True


# --- the approvals log --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppApproval:
    """One record of ``app-approvals.jsonl``: which app the operator approved, when, from where, and what had
    changed against the app approved before it."""

    fab_sha256: str
    fab_id: str
    version: str
    files: dict[str, str]  # path -> sha256
    source: str
    approved_at: str
    previous_fab_sha256: str | None
    changes: list[str]
    key_id: str
    signed_at: int
    signature: str  # Flower's FAB verification signature by the approval key

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AppApproval:
        return cls(
            fab_sha256=str(record["fab_sha256"]),
            fab_id=str(record["fab_id"]),
            version=str(record["version"]),
            files={str(k): str(v) for k, v in dict(record["files"]).items()},
            source=str(record["source"]),
            approved_at=str(record["approved_at"]),
            previous_fab_sha256=record.get("previous_fab_sha256"),
            changes=[str(c) for c in record["changes"]],
            key_id=str(record["flower_verification"]["key_id"]),
            signed_at=int(record["flower_verification"]["signed_at"]),
            signature=str(record["flower_verification"]["signature"]),
        )

    def flower_verification(self) -> str:
        """This approval as one entry of a FAB's ``verifications`` (what Flower's ``_verify_fab`` reads)."""
        return json.dumps({"signature": self.signature, "signed_at": self.signed_at})


@dataclass(frozen=True)
class AppApprovals:
    """A site's approvals log, read and verified: every line signed by its approval key and hash-chained, and
    every record's Flower verification valid."""

    site_dir: Path
    site_id: str
    public_key: Ed25519PublicKey | None  # None: no approval key yet (and so no approval)
    approvals: list[AppApproval]

    @classmethod
    def load(cls, site_dir: Path, site_id: str) -> AppApprovals:
        site_dir = Path(site_dir)
        path = site_dir / APPROVALS_FILE
        if not _approval_key_path(site_dir).exists():
            if path.exists():
                raise AppApprovalError(f"{path} exists but {_approval_key_path(site_dir)} does not: it cannot verify")
            return cls(site_dir, site_id, None, [])
        public_key = load_approval_key(site_dir).public_key()
        read = read_chain(path, kind=CHAIN_KIND, owner=site_id, public_key=public_key, owner_field="site_id")
        if read.issues:
            raise AppApprovalError(f"the approvals log does not verify: {read.issues[0]}")
        approvals = []
        for line, record in enumerate(read.records, start=1):
            try:
                approval = AppApproval.from_record(record)
            except (KeyError, TypeError, ValueError) as e:
                raise AppApprovalError(f"{path}: line {line} is not an approval record ({e!r})") from e
            if not _flower_signature_valid(public_key, approval.fab_sha256, approval.signed_at, approval.signature):
                raise AppApprovalError(f"{path}: line {line}: its FAB signature does not verify")
            approvals.append(approval)
        return cls(site_dir, site_id, public_key, approvals)

    @property
    def last(self) -> AppApproval | None:
        return self.approvals[-1] if self.approvals else None

    def find(self, fab_sha256: str) -> AppApproval | None:
        return next((a for a in self.approvals if a.fab_sha256 == fab_sha256), None)

    def approved_copy(self, approval: AppApproval) -> AppBundle | None:
        """The copy kept of an approved FAB (None if it is gone, or is not the FAB approved)."""
        path = self.site_dir / APPROVED_APPS_DIR / f"{approval.fab_sha256}.fab"
        if not path.is_file() or sha256_hex(path.read_bytes()) != approval.fab_sha256:
            return None
        return AppBundle.from_bytes(path.read_bytes(), where=str(path))

    def trusted_entities(self) -> dict[str, str]:
        """``flower-supernode --trusted-entities``: this site's approval key, and no other."""
        if self.public_key is None:
            return {}
        return {key_id(self.site_id): openssh_public_key(self.public_key)}

    def verifications(self, fab_content: bytes) -> dict[str, str]:
        """The verifications Flower's SuperNode checks, for this FAB: this site's own, whatever the SuperLink sent.
        An app the operator approved gets its record's signature; any other gets none, and Flower refuses it."""
        out = {LICENSE_VERIFICATION: LICENSE_VALUE}
        approval = self.find(sha256_hex(fab_content))
        if approval is not None:
            out[approval.key_id] = approval.flower_verification()
        return out

    def refusal(self, fab_content: bytes) -> str:
        """Why this site refuses an app, naming it, what differs from the app approved last, and what to do."""
        fab_sha256 = sha256_hex(fab_content)
        try:
            offered: AppBundle | None = AppBundle.from_bytes(fab_content, where=f"FAB {fab_sha256}")
        except AppApprovalError as e:
            return f"FAB sha256 {fab_sha256} is not approved by this site's operator, and cannot be read ({e})"
        assert offered is not None
        out = f"FAB sha256 {fab_sha256} ({offered.fab_id} {offered.version}) is not approved by this site's operator"
        if self.last is not None:
            changes = file_changes(self.last.files, offered.file_hashes)
            out += (
                f"; against the app approved at {self.last.approved_at} ({self.last.fab_sha256[:8]}) it "
                f"{'; '.join(c.lower() for c in changes) if changes else 'has the same files in another archive'}"
            )
        return out


def write_trusted_entities(approvals: AppApprovals) -> Path:
    """Write ``trusted-entities.yaml`` (Flower reads it with ``yaml.safe_load``): the approval key only."""
    entities = approvals.trusted_entities()
    if not entities:
        raise AppApprovalError(
            f"no app approved at {approvals.site_dir}: {APPROVE_APP_COMMAND} --site-dir {approvals.site_dir} <app>"
        )
    path = approvals.site_dir / TRUSTED_ENTITIES_FILE
    write_atomic(path, "".join(f"{json.dumps(k)}: {json.dumps(v)}\n" for k, v in entities.items()).encode())
    return path


def keep_offered_app(site_dir: Path, fab_content: bytes) -> Path:
    """Keep a refused FAB in ``offered-apps/`` for its operator to review (the newest few only)."""
    directory = Path(site_dir) / OFFERED_APPS_DIR
    path = directory / f"{sha256_hex(fab_content)}.fab"
    if not path.exists():
        write_atomic(path, fab_content)
    for old in sorted(directory.glob("*.fab"), key=lambda p: p.stat().st_mtime)[:-MAX_OFFERED_APPS]:
        old.unlink(missing_ok=True)
    return path


# --- review and approval ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppReview:
    """An app offered to a site, as its operator reads it before approving."""

    site_dir: Path
    site_id: str
    app: AppBundle
    source: Path
    approvals: AppApprovals
    already: AppApproval | None  # this very app, approved before

    @property
    def previous(self) -> AppApproval | None:
        """The app approved last, which this one is compared with."""
        return self.approvals.last

    @property
    def changes(self) -> list[str]:
        return file_changes(self.previous.files, self.app.file_hashes) if self.previous is not None else []

    def diff(self) -> list[str] | None:
        """The unified diff against the app approved last (None: no copy of it is kept to diff against)."""
        if self.previous is None:
            return None
        before = self.approvals.approved_copy(self.previous)
        return None if before is None else unified_diff(before, self.app)


def review_app(site_dir: Path, source: Path) -> AppReview:
    """Read the app offered in ``source`` (a ``.fab`` file or an app directory) for this site: it is a valid
    FAB, and the site's approvals log verifies. Nothing is written."""
    from shared.enrolment import own_request

    site_dir = Path(site_dir).expanduser().resolve()
    site_id = own_request(site_dir).site_id
    app = read_app(source)
    approvals = AppApprovals.load(site_dir, site_id)
    return AppReview(site_dir, site_id, app, Path(source).expanduser().resolve(), approvals, approvals.find(app.sha256))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def approve_app(review: AppReview) -> AppApproval:
    """Record the operator's approval of the reviewed app: keep a copy of the FAB, append a signed record with
    Flower's verification of it by the site's approval key, and (re)write ``trusted-entities.yaml``.

    The copy is written before the record: a crash in between leaves a copy without a record (not approved),
    never a record without its copy. An app approved before is not recorded twice."""
    if review.already is not None:
        return review.already
    key = _approval_key(review.site_dir)
    app = review.app
    write_atomic(review.site_dir / APPROVED_APPS_DIR / f"{app.sha256}.fab", app.content)
    now = _now()
    signed_at = int(now.timestamp())
    body = {
        "site_id": review.site_id,
        "fab_sha256": app.sha256,
        "fab_id": app.fab_id,
        "version": app.version,
        "files": app.file_hashes,
        "source": str(review.source),
        "approved_at": now.isoformat(timespec="seconds"),
        "previous_fab_sha256": review.previous.fab_sha256 if review.previous is not None else None,
        "changes": review.changes,
        "flower_verification": {
            "key_id": key_id(review.site_id),
            "signed_at": signed_at,
            "signature": flower_signature(key, app.content, signed_at),
        },
    }
    writer = ChainWriter(
        review.site_dir / APPROVALS_FILE, kind=CHAIN_KIND, owner=review.site_id, owner_field="site_id", signing_key=key
    )
    try:
        record = writer.append(lambda records: body)
    except ChainError as e:
        raise AppApprovalError(f"the approvals log does not verify: {e}") from e
    approvals = AppApprovals.load(review.site_dir, review.site_id)
    write_trusted_entities(approvals)
    return AppApproval.from_record(record)
