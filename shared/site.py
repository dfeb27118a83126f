"""Where a site keeps what is its own: identity key, roster, ledger, data, budget, device.

A site's settings come from its own node config, never from the server. In simulation, Flower's node config
only holds ``partition-id``/``num-partitions``; the site then lives under ``<sim-dir>/sites/site-<id>`` and
its data is the partition of the run's dataset (see ``shared/partition.py``). In a deployment the node config
(``flower-supernode --node-config``) names everything explicitly.

The numbers a site's epsilon is accounted with, ``delta`` and ``accountant``, are the site's: a deployed site
must set both; a simulated site pins them in its ``site.toml`` at first use (:func:`pin_simulated_accounting`),
so that no later run config can re-price its history at a looser delta. The budget belongs to the site's
declared ``data-source`` (one per site unless it says otherwise), whatever the rows hash to.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, site_id_for_partition
from shared.ledger import DEFAULT_DATA_SOURCE, SiteLedger
from shared.privacy import ACCOUNTANTS
from shared.secagg.constants import NODE_MIN_COHORT, NODE_THRESHOLD_FRACTION
from shared.tasks.presets import CLASSIFY, TASK_NAMES, TASK_REQUIRED_SITE_KEYS, TASK_SITE_KEYS

LEDGER_FILE = "privacy_ledger.jsonl"
FINGERPRINT_KEY_FILE = "fingerprint.key"  # the site's secret HMAC key of its data fingerprints (0600)
LEDGER_WITNESS_FILE = "ledger-witness.json"  # the ledger's witness by default (shared/ledger_witness.py)
DEFAULT_EVALUATE_NOISE_MULTIPLIER = 20.0  # noise std of each released confusion-matrix count (sensitivity 1)

# Node-config keys a deployed site sets (flower-supernode --node-config "site-id='hospital-a' ...")
NODE_SITE_ID = "site-id"
NODE_SITE_DIR = "site-dir"
NODE_DATA_PATH = "data-path"
NODE_DEVICE = "device"
NODE_MAX_EPSILON = "max-epsilon"
NODE_DELTA = "delta"
NODE_LEDGER = "ledger-path"
NODE_LEDGER_HEAD = "ledger-head-path"  # the ledger's signed head record (default: <ledger>.head.json beside it)
NODE_LEDGER_WITNESS = "ledger-witness"  # the ledger's witness, on other storage (default: in the site dir)
NODE_ROSTER = "roster-path"
NODE_ACCOUNTANT = "accountant"
NODE_DATA_SOURCE = "data-source"
NODE_TEXT_COLUMN = "text-column"
NODE_LABEL_COLUMN = "label-column"
NODE_LABELS = "labels"
NODE_ALLOW_EVALUATE = "allow-evaluate"
NODE_EVALUATE_NOISE = "evaluate-noise-multiplier"
NODE_TASK = "task"  # what the site's data is for (shared.tasks.presets.TASK_NAMES); default "classify"
# Set by Flower's simulation engine
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


class SiteConfigError(ValueError):
    """A site's own configuration is missing or invalid."""


SITE_SETTINGS_FILE = "site.toml"
SIMULATED_SITE_KEYS = (
    NODE_DEVICE,
    NODE_MAX_EPSILON,
    NODE_DELTA,
    NODE_ACCOUNTANT,
    NODE_ALLOW_EVALUATE,
    NODE_EVALUATE_NOISE,
    NODE_MIN_COHORT,
    NODE_THRESHOLD_FRACTION,
    "min-survivors",  # distributed DP noise: shared.distributed_dp.NODE_MIN_SURVIVORS, read there
    "budget-guarantee",  # ... NODE_BUDGET_GUARANTEE
)
PINNED_SITE_KEYS = (NODE_DELTA, NODE_ACCOUNTANT)  # once set, the history is accounted at them


def read_site_settings(site_dir: Path) -> dict[str, Any]:
    """A simulated site's own settings (:data:`SIMULATED_SITE_KEYS`) from ``<site-dir>/site.toml``.

    Flower's simulation gives a virtual node only its partition id; this file plays the part of the node
    config a deployed site sets itself, so simulated sites can have budgets the server does not decide.
    """
    path = Path(site_dir) / SITE_SETTINGS_FILE
    if not path.is_file():
        return {}
    import tomllib

    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SiteConfigError(f"{path} is not valid TOML: {e}") from e
    unknown = sorted(set(raw) - set(SIMULATED_SITE_KEYS))
    if unknown:
        raise SiteConfigError(f"{path}: unknown key(s) {unknown}; a simulated site may set {list(SIMULATED_SITE_KEYS)}")
    return raw


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    return repr(value)


def write_site_settings(site_dir: Path, settings: Mapping[str, Any]) -> Path:
    """Add ``settings`` to a simulated site's ``site.toml`` (what the CLI does for ``--site-max-epsilon``).

    Settings already in the file are kept. A pinned ``delta`` or ``accountant`` is never changed: the site's
    history is accounted at it (changing it is the site operator's decision, made by editing the file).
    """
    unknown = sorted(set(settings) - set(SIMULATED_SITE_KEYS))
    if unknown:
        raise SiteConfigError(f"unknown simulated-site setting(s) {unknown}; allowed: {list(SIMULATED_SITE_KEYS)}")
    path = Path(site_dir) / SITE_SETTINGS_FILE
    current = read_site_settings(site_dir)
    for key in PINNED_SITE_KEYS:
        if key in current and key in settings and settings[key] != current[key]:
            raise SiteConfigError(
                f"{path}: {key} is pinned to {current[key]!r} (the site's history is accounted at it); "
                f"refusing to set {settings[key]!r}"
            )
    merged = {**current, **settings}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".site-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k} = {_toml_value(v)}\n" for k, v in merged.items()))
    os.replace(tmp, path)  # readers see the old file or the new one, never half of it
    return path


@dataclass(frozen=True)
class Site:
    """Everything a client knows about itself, from its own config."""

    site_id: str
    site_dir: Path
    identity_key_path: Path
    roster_path: Path
    ledger_path: Path
    data_path: Path | None  # None: the run's simulated partition
    partition_id: int | None  # simulation only
    num_partitions: int | None
    device: str
    max_epsilon: float  # inf: no site budget
    delta: float | None  # None: a simulated site not yet pinned (see pin_simulated_accounting)
    accountant: str | None = None  # None: as delta
    data_source: str = DEFAULT_DATA_SOURCE  # what the budget belongs to
    text_column: str = "text"  # a deployed site's own columns and label set (class-index order)
    label_column: str = "label"
    labels: tuple[str, ...] | None = None  # None: simulated (the run's dataset)
    allow_evaluate: bool = False  # answer the server's evaluate requests (DP-noised, ledgered)
    evaluate_noise_multiplier: float = DEFAULT_EVALUATE_NOISE_MULTIPLIER
    secagg_min_cohort: int = 3  # fewest distinct roster sites in a secure round (secagg-min-cohort)
    secagg_threshold_fraction: float = 2 / 3  # t >= ceil(f * (k + 1)) (secagg-threshold-fraction)
    ledger_head_path: Path | None = None  # None: beside the ledger (shared.ledger_head.default_head_path)
    task: str = CLASSIFY  # what a deployed site's data is for (node config ``task``); a run of another is refused
    ledger_witness_path: Path | None = None  # None: <site-dir>/ledger-witness.json (node config ``ledger-witness``)

    @property
    def simulated(self) -> bool:
        return self.partition_id is not None

    @property
    def fingerprint_key_path(self) -> Path:
        return self.site_dir / FINGERPRINT_KEY_FILE

    @property
    def witness_path(self) -> Path:
        """Where the ledger's witness is kept (shared/ledger_witness.py): ``ledger-witness``, or the site dir."""
        return self.ledger_witness_path if self.ledger_witness_path is not None else self.site_dir / LEDGER_WITNESS_FILE

    def accounting(self) -> tuple[float, str]:
        """``(delta, accountant)`` every epsilon of this site is composed at; an error while unset."""
        if self.delta is None or self.accountant is None:
            missing = [k for k, v in ((NODE_DELTA, self.delta), (NODE_ACCOUNTANT, self.accountant)) if v is None]
            raise SiteConfigError(f"site {self.site_id!r} has no {' and '.join(missing)} of its own")
        return self.delta, self.accountant


def _float(node_config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in node_config:
        return default
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SiteConfigError(f"node config {key!r} must be a number, got {value!r}")
    return float(value)


def _secagg_limits(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The site's own secure-aggregation limits (``secagg-min-cohort``, ``secagg-threshold-fraction``)."""
    out: dict[str, Any] = {}
    if NODE_MIN_COHORT in settings:
        value = settings[NODE_MIN_COHORT]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise SiteConfigError(f"{where} {NODE_MIN_COHORT!r} must be an int >= 2, got {value!r}")
        out["secagg_min_cohort"] = value
    if NODE_THRESHOLD_FRACTION in settings:
        value = settings[NODE_THRESHOLD_FRACTION]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 2 / 3 - 1e-9 <= value <= 1:
            raise SiteConfigError(f"{where} {NODE_THRESHOLD_FRACTION!r} must be a number in [2/3, 1], got {value!r}")
        out["secagg_threshold_fraction"] = float(value)
    return out


def _bool(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if not isinstance(value, bool):
        raise SiteConfigError(f"node config {key!r} must be true or false, got {value!r}")
    return value


def _text(node_config: Mapping[str, Any], key: str, default: str) -> str:
    value = node_config.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise SiteConfigError(f"node config {key!r} must be a non-empty string, got {value!r}")
    return value


def parse_labels(value: Any, *, where: str = f"node config {NODE_LABELS!r}") -> tuple[str, ...]:
    """A comma-separated label set in class-index order (``"rotten,fresh"``): at least 2 distinct names."""
    if not isinstance(value, str):
        raise SiteConfigError(f"{where} must be a comma-separated string, got {value!r}")
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise SiteConfigError(f"{where} must name at least 2 distinct labels, got {value!r}")
    return names


def _own_settings(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The settings every site may set (node config or site.toml), checked; ``where`` names the file."""
    try:
        max_epsilon = _float(settings, NODE_MAX_EPSILON, math.inf)
        delta = _float(settings, NODE_DELTA, None)
        noise = _float(settings, NODE_EVALUATE_NOISE, DEFAULT_EVALUATE_NOISE_MULTIPLIER)
        allow_evaluate = _bool(settings, NODE_ALLOW_EVALUATE)
    except SiteConfigError as e:
        raise SiteConfigError(f"{where}: {e}") from e
    assert max_epsilon is not None and noise is not None
    if not max_epsilon > 0:
        raise SiteConfigError(f"{where}: {NODE_MAX_EPSILON!r} must be > 0, got {max_epsilon}")
    if delta is not None and not 0.0 < delta < 1.0:
        raise SiteConfigError(f"{where}: {NODE_DELTA!r} must be in (0, 1), got {delta}")
    accountant = settings.get(NODE_ACCOUNTANT)
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise SiteConfigError(f"{where}: {NODE_ACCOUNTANT!r} must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    if not (noise > 0 and math.isfinite(noise)):
        raise SiteConfigError(f"{where}: {NODE_EVALUATE_NOISE!r} must be finite and > 0, got {noise}")
    return {
        "device": str(settings.get(NODE_DEVICE, "cpu")),
        "max_epsilon": max_epsilon,
        "delta": delta,
        "accountant": accountant,
        "allow_evaluate": allow_evaluate,
        "evaluate_noise_multiplier": noise,
        **_secagg_limits(settings, where),
    }


def _site_task(node_config: Mapping[str, Any], site_id: str) -> str:
    """The deployed site's task (``task``, default ``classify``); a key only another task reads is an error."""
    task = node_config.get(NODE_TASK, CLASSIFY)
    if task not in TASK_NAMES:
        raise SiteConfigError(
            f"node config of site {site_id!r}: {NODE_TASK!r} must be one of {list(TASK_NAMES)}, got {task!r}"
        )
    others = sorted({k for keys in TASK_SITE_KEYS.values() for k in keys} - set(TASK_SITE_KEYS[task]))
    stray = [k for k in others if k in node_config]
    if stray:
        raise SiteConfigError(
            f"node config of site {site_id!r}: {stray} do(es) not apply to its task {task!r} (set {NODE_TASK!r} if "
            "the site's data is for another task)"
        )
    return str(task)


def site_from_node_config(node_config: Mapping[str, Any], *, sim_dir: Path) -> Site:
    """Build the :class:`Site` from a node config (deployment) or from the simulation's partition id."""
    if NODE_SITE_ID in node_config:  # a deployed site: everything explicit
        site_id = str(node_config[NODE_SITE_ID])
        task = _site_task(node_config, site_id)
        for required in (NODE_SITE_DIR, NODE_DATA_PATH, NODE_DELTA, NODE_ACCOUNTANT, *TASK_REQUIRED_SITE_KEYS[task]):
            if required not in node_config:
                raise SiteConfigError(
                    f"node config of site {site_id!r} must set {required!r}"
                    + (
                        " (the site's own; its epsilon is always accounted at it, never at the run config's)"
                        if required in PINNED_SITE_KEYS
                        else ""
                    )
                )
        own = _own_settings(node_config, "node config")
        site_dir = Path(str(node_config[NODE_SITE_DIR])).expanduser()
        return Site(
            site_id=site_id,
            site_dir=site_dir,
            identity_key_path=site_dir / IDENTITY_KEY_FILE,
            roster_path=Path(str(node_config.get(NODE_ROSTER, site_dir / ROSTER_FILE))),
            ledger_path=Path(str(node_config.get(NODE_LEDGER, site_dir / LEDGER_FILE))),
            data_path=Path(str(node_config[NODE_DATA_PATH])).expanduser(),
            partition_id=None,
            num_partitions=None,
            data_source=_text(node_config, NODE_DATA_SOURCE, DEFAULT_DATA_SOURCE),
            text_column=_text(node_config, NODE_TEXT_COLUMN, "text"),
            label_column=_text(node_config, NODE_LABEL_COLUMN, "label"),
            labels=parse_labels(node_config[NODE_LABELS]) if NODE_LABELS in node_config else None,
            task=task,
            ledger_head_path=(
                Path(str(node_config[NODE_LEDGER_HEAD])).expanduser() if NODE_LEDGER_HEAD in node_config else None
            ),
            ledger_witness_path=(
                Path(_text(node_config, NODE_LEDGER_WITNESS, "")).expanduser()
                if NODE_LEDGER_WITNESS in node_config
                else None
            ),
            **own,
        )

    if NODE_PARTITION_ID not in node_config:
        raise SiteConfigError(
            f"node config has neither {NODE_SITE_ID!r} (deployed site) nor {NODE_PARTITION_ID!r} (simulation)"
        )
    partition_id = int(node_config[NODE_PARTITION_ID])
    site_id = site_id_for_partition(partition_id)
    site_dir = Path(sim_dir) / "sites" / site_id
    # a simulated site's own settings: its site.toml, if it has one (Flower's node config has only the partition)
    extra = {k: v for k, v in node_config.items() if k not in (NODE_PARTITION_ID, NODE_NUM_PARTITIONS)}
    own = _own_settings({**extra, **read_site_settings(site_dir)}, str(site_dir / SITE_SETTINGS_FILE))
    return Site(
        site_id=site_id,
        site_dir=site_dir,
        identity_key_path=site_dir / IDENTITY_KEY_FILE,
        roster_path=Path(sim_dir) / ROSTER_FILE,
        ledger_path=site_dir / LEDGER_FILE,
        data_path=None,
        partition_id=partition_id,
        num_partitions=int(node_config.get(NODE_NUM_PARTITIONS, 0)) or None,
        **own,
    )


def pin_simulated_accounting(site: Site, *, delta: float, accountant: str) -> Site:
    """A simulated site's first use: write the delta and accountant it will always be accounted at into its
    ``site.toml``, and return the site with them.

    They are taken from the site's ledger when it already has entries (a site from before pinning: its
    history stays at the delta it was recorded at), else from ``delta``/``accountant`` (the first run's
    config; in a simulation one party plays every role). Later runs' configs cannot change them.
    """
    if not site.simulated or (site.delta is not None and site.accountant is not None):
        return site
    first = None
    if site.ledger_path.exists():
        entries = SiteLedger(site.ledger_path, site_id=site.site_id).entries()
        first = entries[0] if entries else None
    pinned_delta = site.delta if site.delta is not None else (first.delta if first else float(delta))
    pinned_accountant = site.accountant or (first.accountant if first else accountant)
    write_site_settings(site.site_dir, {NODE_DELTA: pinned_delta, NODE_ACCOUNTANT: pinned_accountant})
    return replace(site, delta=pinned_delta, accountant=pinned_accountant)


def site_from_context(context: Any) -> Site:
    """The :class:`Site` of the node running ``context`` (a Flower Context): node config + the run's sim dir.

    A simulated site is pinned to its delta and accountant here, at its first use."""
    from shared.config import RunConfig

    cfg = RunConfig.from_flower(context.run_config)
    site = site_from_node_config(context.node_config, sim_dir=cfg.simulation_dir(context.run_id))
    return pin_simulated_accounting(site, delta=cfg.delta, accountant=cfg.accountant)
