"""Provisioning of a deployed federation: the coordinator's CA and SuperLink certificate, the roster of the
sites' public keys, and one bundle per site, made from the sites' own requests.

Each site makes its own keys (``privatune site init``, see ``shared/enrolment.py``) and sends the coordinator
only a signed request with its public keys (``shared/site_request.py``). Then
``privatune provision --out DIR --site-request hospital-a.json ... --superlink-host link.example.org`` writes::

    DIR/coordinator/   ca.pem ca.key superlink.pem superlink.key roster.json
                       requests/<site>.json   (the accepted requests, re-verified on every run)
                       node-keys/<site>.pub   (what the coordinator registers with ``flwr supernode register``)
                       flwr-config.toml       (a Flower CLI connection to the SuperLink, TLS-verified by ca.pem)
                       countersignatures/<site>.json   (each site's countersignature of the roster it approved)
    DIR/bundles/<site>/ roster.json ca.pem connection.toml roster-countersignatures.json   (public files only)

The coordinator never makes, sees or holds a site's private key; its own two private keys (CA, SuperLink TLS)
are created with mode 0600 and never copied. A site uses the roster only after its operator approved it
(``privatune site approve-roster``), so a roster the coordinator changes later (a site added, a key swapped) is
refused by every site until that site's operator approves it again. Re-running with more requests keeps every
existing key, certificate and accepted request, and rewrites the roster and every bundle. Each site
countersigns the roster it approved; re-running with ``--countersignature`` collects those countersignatures
and puts every one of the current roster into each bundle, for the sites to install (a site uses its roster
only once every other site countersigned it; ``shared/countersignature.py``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.countersignature import (
    COUNTERSIGNATURES_FILE,
    Countersignature,
    CountersignatureError,
    verified_countersignatures,
    write_countersignature,
    write_countersignatures,
)
from shared.identity import (
    ROSTER_FILE,
    IdentityError,
    Roster,
    load_private_key,
    load_site_roster,
    public_key_from_hex,
)
from shared.site_request import SiteRequest, SiteRequestError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.pem"
SUPERLINK_KEY = "superlink.key"
NODE_AUTH_KEY = "node_auth_key"
NODE_AUTH_PUB = "node_auth_key.pub"
NODE_CONFIG_FILE = "node-config.toml"
FLWR_CONFIG_FILE = "flwr-config.toml"
NODE_KEYS_DIR = "node-keys"
REQUESTS_DIR = "requests"
COUNTERSIGNATURES_DIR = "countersignatures"
BUNDLES_DIR = "bundles"
CONNECTION_FILE = "connection.toml"
DEFAULT_PORT = 9092
CERT_DAYS = 825


class ProvisionError(ValueError):
    """Provisioning input, or a bundle on disk, is missing or invalid."""


@dataclass(frozen=True)
class Federation:
    """Where ``provision`` put things."""

    coordinator_dir: Path
    bundle_dirs: dict[str, Path]  # site id -> its bundle (public files only)
    superlink_address: str
    roster_fingerprint: str
    request_fingerprints: dict[str, str]  # site id -> its request's fingerprint
    countersigned: dict[str, tuple[str, ...]] = field(default_factory=dict)  # site -> whom it confirmed (this roster)

    @property
    def awaiting_countersignature(self) -> list[str]:
        """The sites that have not countersigned the current roster (none of them can use it yet)."""
        return sorted(set(self.request_fingerprints) - set(self.countersigned))


def _write_new_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_private_key_file(path: Path, *, what: str) -> Path:
    """A private key file must exist, be a regular file, and be readable by its owner only."""
    path = Path(path)
    if not path.is_file():
        raise ProvisionError(f"{what} not found: {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ProvisionError(f"{what} {path} has mode {mode:04o}; it must be 0600 (chmod 600 {path})")
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PrivaTune"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "PrivaTune federation CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for every name/IP in ``hosts`` (and loopback)."""
    if not hosts:
        raise ProvisionError("the SuperLink certificate needs at least one host name or IP address")
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))  # the ServerApp reaches it on loopback
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_node_auth_key() -> tuple[bytes, bytes]:
    """The (private, public) key pair Flower's SuperNode authentication takes: EC P-384 in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def node_config_template(site_id: str, site_dir: Path) -> str:
    """The site's own settings, in the TOML ``flower-supernode --node-config`` reads. The site edits it."""
    return f"""# {site_id}'s own settings: flower-supernode --node-config {site_dir / NODE_CONFIG_FILE}
# The server cannot change any of these; a run whose config disagrees with them is refused by this site.
site-id = "{site_id}"
site-dir = "{site_dir}"
# What your data is for: "classify" (a text classifier: the columns and labels below) or "causal-lm" (JSONL
# with prompt/response, messages or text fields: then delete text-column, label-column and labels). A run of
# another task is refused.
task = "classify"
# Your training data (.csv/.jsonl/.parquet with the run's text and label columns). EDIT THIS.
data-path = "{site_dir / "data.csv"}"
# cpu, cuda:0, ...
device = "cpu"
# Your total privacy budget over every run, and the delta and accountant it is always accounted at
# (required: a run config never changes them).
max-epsilon = 8.0
delta = 1e-5
accountant = "prv"
# Your data's columns and label set, in class-index order (a run whose labels differ is refused). EDIT THIS.
text-column = "text"
label-column = "label"
labels = "rotten,fresh"
# What your budget belongs to: every release from this data composes, whatever the rows' hash.
data-source = "default"
# Answer the server's evaluate requests with DP-noised counts (charged to your budget): off by default.
allow-evaluate = false
ledger-path = "{site_dir / "privacy_ledger.jsonl"}"
# The ledger's witness: on storage the ledger's backups and restores do not touch (another disk or share), so
# that a ledger restored from an older copy, or deleted, is refused. Default: in this directory.
# ledger-witness = "/mnt/other-disk/privatune/{site_id}.witness.json"
roster-path = "{site_dir / ROSTER_FILE}"
# Refuse any round without secure aggregation, and any secure round with fewer distinct sites than this.
require-secagg = true
secagg-min-cohort = 3
"""


def flwr_connection_config(superlink_address: str, ca_cert_path: Path, name: str = "privatune") -> str:
    """A ``$FLWR_HOME/config.toml`` for the coordinator's Flower CLI (flwr run / supernode register / ls)."""
    return f"""[superlink]
default = "{name}"

[superlink.{name}]
address = "{superlink_address}"
root-certificates = "{ca_cert_path}"
"""


def _load_ca(coord: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path = check_private_key_file(coord / CA_KEY, what="CA private key")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((coord / CA_CERT).read_bytes())
    except (ValueError, FileNotFoundError) as e:
        raise ProvisionError(f"coordinator CA in {coord} is unreadable: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"CA private key {key_path} is not an EC key")
    return key, cert


def _request_paths(sources: Sequence[Path], *, what: str = "site request") -> list[Path]:
    """Request (or countersignature) files: each source is one, or a directory whose ``*.json`` files all are."""
    paths: list[Path] = []
    for source in sources:
        source = Path(source).expanduser()
        if source.is_dir():
            found = sorted(source.glob("*.json"))
            if not found:
                raise ProvisionError(f"no {what} (*.json) in directory {source}")
            paths.extend(found)
        else:
            paths.append(source)
    return paths


def _load_request(path: Path) -> SiteRequest:
    try:
        return SiteRequest.load(path)
    except SiteRequestError as e:
        raise ProvisionError(str(e)) from e


def _check_distinct(requests: dict[str, SiteRequest], where: dict[str, Path]) -> None:
    """No two sites share an identity key or a node-auth key."""
    for attr, what in (("identity_public_key", "identity key"), ("node_auth_public_key", "node-auth key")):
        owner: dict[str, str] = {}
        for site_id, request in requests.items():
            key = getattr(request, attr)
            if key in owner:
                raise ProvisionError(
                    f"sites {owner[key]!r} ({where[owner[key]]}) and {site_id!r} ({where[site_id]}) have the same "
                    f"{what}: every site makes its own keys (privatune site init)"
                )
            owner[key] = site_id


def _accepted_requests(coord: Path) -> tuple[dict[str, SiteRequest], dict[str, Path]]:
    """The requests an earlier ``provision`` accepted (kept under ``coordinator/requests/``), verified again."""
    accepted: dict[str, SiteRequest] = {}
    where: dict[str, Path] = {}
    for path in sorted((coord / REQUESTS_DIR).glob("*.json")):
        request = _load_request(path)
        if path.stem != request.site_id:
            raise ProvisionError(f"accepted request {path} is for site {request.site_id!r}, not {path.stem!r}")
        accepted[request.site_id], where[request.site_id] = request, path
    return accepted, where


def _same_keys(a: SiteRequest, b: SiteRequest) -> bool:
    return (a.identity_public_key, a.node_auth_public_key) == (b.identity_public_key, b.node_auth_public_key)


def merge_requests(coord: Path, sources: Sequence[Path]) -> tuple[dict[str, SiteRequest], list[SiteRequest]]:
    """Every site's request (accepted before, plus the new ones), and the new ones; nothing is written.

    Refused: a request that does not verify, two requests for one site, a site already enrolled with other
    keys (a site's keys are never replaced by provisioning), two sites with one key."""
    sites, where = _accepted_requests(coord)
    new: list[SiteRequest] = []
    new_where: dict[str, Path] = {}
    for path in _request_paths(sources):
        request = _load_request(path)
        if request.site_id in new_where:
            raise ProvisionError(f"two requests for site {request.site_id!r}: {new_where[request.site_id]} and {path}")
        new_where[request.site_id] = path
        if request.site_id in sites:
            if not _same_keys(sites[request.site_id], request):
                raise ProvisionError(
                    f"site {request.site_id!r} is already enrolled ({where[request.site_id]}) with other keys; "
                    f"{path} would replace them, which provisioning never does"
                )
            continue
        sites[request.site_id], where[request.site_id] = request, path
        new.append(request)
    _check_distinct(sites, where)
    if not sites:
        raise ProvisionError("provision needs at least one site request (--site-request FILE or DIR)")
    return sites, new


def given_countersignatures(sources: Sequence[Path], roster: Roster) -> dict[str, Countersignature]:
    """The sites' countersignatures handed to ``provision``, each checked: of a site in ``roster``, of this very
    roster, and signed by that site's identity key; one per site. Nothing is written."""
    fingerprint = roster.fingerprint()
    out: dict[str, Countersignature] = {}
    where: dict[str, Path] = {}
    for path in _request_paths(sources, what="countersignature"):
        try:
            countersignature = Countersignature.load(path)
            site_id = countersignature.site_id
            if site_id not in roster.keys:
                raise ProvisionError(f"countersignature {path} is of site {site_id!r}, which is not in the roster")
            if countersignature.roster_fingerprint != fingerprint:
                raise ProvisionError(
                    f"countersignature {path} of site {site_id!r} is of roster {countersignature.roster_fingerprint}, "
                    f"not the current roster {fingerprint}: that site approved another roster; send it its bundle "
                    "of the current one"
                )
            countersignature.verify(roster.keys[site_id])
        except CountersignatureError as e:
            raise ProvisionError(str(e)) from e
        if site_id in out:
            raise ProvisionError(f"two countersignatures of site {site_id!r}: {where[site_id]} and {path}")
        out[site_id], where[site_id] = countersignature, path
    return out


def _collected_countersignatures(coord: Path, roster: Roster) -> dict[str, Countersignature]:
    """The countersignatures of the current roster collected so far (those of earlier rosters are kept on disk
    but left out)."""
    try:
        stored = [Countersignature.load(p) for p in sorted((coord / COUNTERSIGNATURES_DIR).glob("*.json"))]
        return verified_countersignatures(stored, roster_fingerprint=roster.fingerprint(), keys=roster.keys)
    except CountersignatureError as e:
        raise ProvisionError(f"{coord / COUNTERSIGNATURES_DIR}: {e}") from e


def roster_of(requests: dict[str, SiteRequest]) -> Roster:
    return Roster(
        {s: public_key_from_hex(r.identity_public_key) for s, r in requests.items()},
        {s: r.node_auth_public_key for s, r in requests.items()},
    )


def connection_config(superlink_address: str) -> str:
    """The site's side of the connection: where its SuperNode reaches the SuperLink."""
    return f'superlink = "{superlink_address}"\n'


def provision(
    out: Path,
    requests: Sequence[Path],
    *,
    superlink_hosts: list[str],
    port: int = DEFAULT_PORT,
    countersignatures: Sequence[Path] = (),
) -> Federation:
    """Create (or extend) the coordinator's files and one bundle per site under ``out``, from the sites' requests,
    and collect the sites' ``countersignatures`` of the roster into every bundle.

    No site private key is made or seen here. Idempotent: a request already accepted is a no-op."""
    if not 0 < port < 65536:
        raise ProvisionError(f"port must be in 1..65535, got {port}")
    if not superlink_hosts:
        raise ProvisionError("the SuperLink certificate needs at least one host name or IP address")
    out = Path(out).expanduser().resolve()
    coord = out / "coordinator"
    sites, _ = merge_requests(coord, requests)  # every check before anything is written
    roster = roster_of(sites)
    given = given_countersignatures(countersignatures, roster)

    if (coord / CA_KEY).exists():
        ca_key, ca_cert = _load_ca(coord)
    else:
        ca_key, ca_cert = make_ca()
        _write_new_private(coord / CA_KEY, _pem_key(ca_key))
        _write_public(coord / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    if not (coord / SUPERLINK_KEY).exists():
        link_key, link_cert = make_server_cert(ca_key, ca_cert, superlink_hosts)
        _write_new_private(coord / SUPERLINK_KEY, _pem_key(link_key))
        _write_public(coord / SUPERLINK_CERT, link_cert.public_bytes(serialization.Encoding.PEM))
    address = f"{superlink_hosts[0]}:{port}"
    _write_public(coord / FLWR_CONFIG_FILE, flwr_connection_config(address, coord / CA_CERT).encode())

    for site_id, request in sites.items():
        _write_public(coord / REQUESTS_DIR / f"{site_id}.json", request.to_json().encode())
        _write_public(coord / NODE_KEYS_DIR / f"{site_id}.pub", (request.node_auth_public_key + "\n").encode())
    _write_public(coord / ROSTER_FILE, roster.to_json().encode())
    for site_id, countersignature in given.items():
        write_countersignature(coord / COUNTERSIGNATURES_DIR / f"{site_id}.json", countersignature)
    collected = _collected_countersignatures(coord, roster)
    bundles = {}
    for site_id in sorted(sites):
        bundle = out / BUNDLES_DIR / site_id
        _write_public(bundle / ROSTER_FILE, roster.to_json().encode())
        _write_public(bundle / CA_CERT, (coord / CA_CERT).read_bytes())
        _write_public(bundle / CONNECTION_FILE, connection_config(address).encode())
        write_countersignatures(bundle / COUNTERSIGNATURES_FILE, collected.values())
        bundles[site_id] = bundle
    return Federation(
        coord,
        bundles,
        address,
        roster.fingerprint(),
        {s: r.fingerprint() for s, r in sites.items()},
        {s: c.confirmed for s, c in collected.items()},
    )


def check_bundle(site_dir: Path) -> Path:
    """Check a site's directory before the SuperNode starts: every file present, private keys 0600, valid keys,
    a complete node config, a roster this site's operator approved (pinned), this site's own keys in it, a ledger
    that agrees with its head record and witness, and an app its operator approved (its approvals log verifies)."""
    import tomllib

    from client.site_policy import check_node_config
    from shared.app_approval import APPROVE_APP_COMMAND, AppApprovalError, AppApprovals
    from shared.site import SiteConfigError, site_from_node_config

    site_dir = Path(site_dir).expanduser().resolve()
    if not site_dir.is_dir():
        raise ProvisionError(f"site directory not found: {site_dir}")
    for name in (CA_CERT, ROSTER_FILE, NODE_CONFIG_FILE):
        if not (site_dir / name).is_file():
            raise ProvisionError(
                f"site directory {site_dir} lacks {name} (privatune site init makes node-config.toml; "
                f"privatune site approve-roster --site-dir {site_dir} <coordinator's bundle> installs the rest)"
            )
    try:
        x509.load_pem_x509_certificate((site_dir / CA_CERT).read_bytes())
    except ValueError as e:
        raise ProvisionError(f"{site_dir / CA_CERT} is not a PEM certificate: {e}") from e
    auth = check_private_key_file(site_dir / NODE_AUTH_KEY, what="node authentication key")
    try:
        key = serialization.load_ssh_private_key(auth.read_bytes(), password=None)
    except ValueError as e:
        raise ProvisionError(f"node authentication key {auth} is not an OpenSSH private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"node authentication key {auth} must be an EC (NIST P-384) key")
    config_path = site_dir / NODE_CONFIG_FILE
    try:
        node_config = tomllib.loads(config_path.read_text())
        check_node_config(node_config)
        site = site_from_node_config(node_config, sim_dir=site_dir)
    except tomllib.TOMLDecodeError as e:
        raise ProvisionError(f"{config_path} is not valid TOML: {e}") from e
    except SiteConfigError as e:
        raise ProvisionError(f"{config_path}: {e}") from e
    if site.simulated:
        raise ProvisionError(f"{config_path} must set site-id (a deployed site)")
    identity = load_private_key(check_private_key_file(site.identity_key_path, what="identity key"))
    node_auth = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    try:
        roster = load_site_roster(site)  # refused unless this site's operator approved this very roster
        roster.check_entry(site.site_id, identity=identity.public_key(), node_auth=node_auth.decode())
    except IdentityError as e:
        raise ProvisionError(f"{config_path}: {e}") from e
    if site.data_path is None or not site.data_path.is_file():
        raise ProvisionError(f"{config_path}: data-path {site.data_path} does not exist (edit data-path)")
    from shared.ledger import LedgerError
    from shared.ledger_override import review_ledger

    try:  # the ledger against its head record and witness, as every release checks it (read only here)
        problem = review_ledger(
            site.ledger_path,
            site_id=site.site_id,
            signing_key=identity,
            witness_path=site.witness_path,
            head_path=site.ledger_head_path,
            proof_of_use=site.fingerprint_key_path,
        )
    except LedgerError as e:
        raise ProvisionError(f"{config_path}: {e}") from e
    if problem is not None:
        raise ProvisionError(f"{config_path}: the site would refuse every release: {problem}")
    try:
        approvals = AppApprovals.load(site_dir, site.site_id)
    except AppApprovalError as e:
        raise ProvisionError(f"{site_dir}: {e}") from e
    if not approvals.approvals:
        raise ProvisionError(
            f"no app approved at {site_dir} yet: the SuperNode would refuse every run. Approve the app the "
            f"coordinator sent (its .fab, or the app directory): {APPROVE_APP_COMMAND} --site-dir {site_dir} <app>"
        )
    return site_dir


# Flower's phone-home and run-time installs, all off at a site: nothing but the SuperLink is contacted
QUIET_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def superlink_command(
    coordinator_dir: Path, *, database: Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT
) -> list[str]:
    """``flower-superlink`` with TLS from the coordinator's files, SuperNode authentication on, state on disk."""
    coord = Path(coordinator_dir)
    check_private_key_file(coord / SUPERLINK_KEY, what="SuperLink TLS key")
    for name in (SUPERLINK_CERT, CA_CERT):
        if not (coord / name).is_file():
            raise ProvisionError(f"coordinator directory {coord} lacks {name}")
    return [
        "flower-superlink",
        "--ssl-certfile", str(coord / SUPERLINK_CERT),
        "--ssl-keyfile", str(coord / SUPERLINK_KEY),
        "--ssl-ca-certfile", str(coord / CA_CERT),
        "--enable-supernode-auth",
        "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def supernode_command(site_dir: Path, superlink: str, *, runtime_port: int = 9094) -> list[str]:
    """Flower's SuperNode for a site bundle: TLS verified by the bundle's CA, its node-auth key, its node config,
    and Flower's app check (``--trusted-entities``) fed by the site's app approvals, so that it runs only the
    apps its operator approved (``client/supernode.py`` runs ``flower-supernode`` so).

    No ``--max-retries``/``--max-wait-time``: the SuperNode retries with backoff for as long as the SuperLink is
    away (a SuperLink restart is survived)."""
    import sys

    from shared.app_approval import TRUSTED_ENTITIES_FILE

    site_dir = check_bundle(site_dir)
    return [
        sys.executable, "-m", "client.supernode",
        "--site-dir", str(site_dir),
        "--trusted-entities", str(site_dir / TRUSTED_ENTITIES_FILE),
        "--superlink", superlink,
        "--root-certificates", str(site_dir / CA_CERT),
        "--auth-supernode-private-key", str(site_dir / NODE_AUTH_KEY),
        "--node-config", str(site_dir / NODE_CONFIG_FILE),
        "--port", str(runtime_port),
    ]  # fmt: skip
