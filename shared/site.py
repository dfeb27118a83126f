"""Where a site keeps what is its own: identity key, roster, ledger, data, budget, device.

A site's settings come from its own node config, never from the server. In simulation, Flower's node config
only holds ``partition-id``/``num-partitions``; the site then lives under ``<sim-dir>/sites/site-<id>`` and
its data is the partition of the run's dataset (see ``shared/partition.py``). In a deployment the node config
(``flower-supernode --node-config``) names everything explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, site_id_for_partition

LEDGER_FILE = "privacy_ledger.jsonl"

# Node-config keys a deployed site sets (flower-supernode --node-config "site-id='hospital-a' ...")
NODE_SITE_ID = "site-id"
NODE_SITE_DIR = "site-dir"
NODE_DATA_PATH = "data-path"
NODE_DEVICE = "device"
NODE_MAX_EPSILON = "max-epsilon"
NODE_DELTA = "delta"
NODE_LEDGER = "ledger-path"
NODE_LEDGER_HEAD = "ledger-head-path"  # the ledger's signed head record (default: <ledger>.head.json beside it)
NODE_ROSTER = "roster-path"
# Set by Flower's simulation engine
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


class SiteConfigError(ValueError):
    """A site's own configuration is missing or invalid."""


SITE_SETTINGS_FILE = "site.toml"
SIMULATED_SITE_KEYS = (NODE_DEVICE, NODE_MAX_EPSILON, NODE_DELTA)


def read_site_settings(site_dir: Path) -> dict[str, Any]:
    """A simulated site's own settings (``max-epsilon``, ``delta``, ``device``) from ``<site-dir>/site.toml``.

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


def write_site_settings(site_dir: Path, settings: Mapping[str, Any]) -> Path:
    """Write a simulated site's ``site.toml`` (what the CLI does for ``--site-max-epsilon``)."""
    unknown = sorted(set(settings) - set(SIMULATED_SITE_KEYS))
    if unknown:
        raise SiteConfigError(f"unknown simulated-site setting(s) {unknown}; allowed: {list(SIMULATED_SITE_KEYS)}")
    lines = [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in settings.items()]
    path = Path(site_dir) / SITE_SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
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
    delta: float | None  # None: the run's delta
    ledger_head_path: Path | None = None  # None: beside the ledger (shared.ledger_head.default_head_path)

    @property
    def simulated(self) -> bool:
        return self.partition_id is not None


def _float(node_config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in node_config:
        return default
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SiteConfigError(f"node config {key!r} must be a number, got {value!r}")
    return float(value)


def site_from_node_config(node_config: Mapping[str, Any], *, sim_dir: Path) -> Site:
    """Build the :class:`Site` from a node config (deployment) or from the simulation's partition id."""
    device = str(node_config.get(NODE_DEVICE, "cpu"))
    max_epsilon = _float(node_config, NODE_MAX_EPSILON, math.inf)
    delta = _float(node_config, NODE_DELTA, None)
    assert max_epsilon is not None
    if not max_epsilon > 0:
        raise SiteConfigError(f"node config {NODE_MAX_EPSILON!r} must be > 0, got {max_epsilon}")
    if delta is not None and not 0.0 < delta < 1.0:
        raise SiteConfigError(f"node config {NODE_DELTA!r} must be in (0, 1), got {delta}")

    if NODE_SITE_ID in node_config:  # a deployed site: everything explicit
        site_id = str(node_config[NODE_SITE_ID])
        if NODE_SITE_DIR not in node_config:
            raise SiteConfigError(f"node config sets {NODE_SITE_ID!r} but not {NODE_SITE_DIR!r}")
        site_dir = Path(str(node_config[NODE_SITE_DIR])).expanduser()
        if NODE_DATA_PATH not in node_config:
            raise SiteConfigError(f"node config of site {site_id!r} must set {NODE_DATA_PATH!r}")
        return Site(
            site_id=site_id,
            site_dir=site_dir,
            identity_key_path=site_dir / IDENTITY_KEY_FILE,
            roster_path=Path(str(node_config.get(NODE_ROSTER, site_dir / ROSTER_FILE))),
            ledger_path=Path(str(node_config.get(NODE_LEDGER, site_dir / LEDGER_FILE))),
            data_path=Path(str(node_config[NODE_DATA_PATH])).expanduser(),
            partition_id=None,
            num_partitions=None,
            device=device,
            max_epsilon=max_epsilon,
            delta=delta,
            ledger_head_path=(
                Path(str(node_config[NODE_LEDGER_HEAD])).expanduser() if NODE_LEDGER_HEAD in node_config else None
            ),
        )

    if NODE_PARTITION_ID not in node_config:
        raise SiteConfigError(
            f"node config has neither {NODE_SITE_ID!r} (deployed site) nor {NODE_PARTITION_ID!r} (simulation)"
        )
    partition_id = int(node_config[NODE_PARTITION_ID])
    site_id = site_id_for_partition(partition_id)
    site_dir = Path(sim_dir) / "sites" / site_id
    own = read_site_settings(site_dir)  # a simulated site's own settings: its site.toml, if it has one
    if own:
        merged = {**own, NODE_PARTITION_ID: partition_id}
        device = str(merged.get(NODE_DEVICE, device))
        max_epsilon = _float(merged, NODE_MAX_EPSILON, max_epsilon)
        delta = _float(merged, NODE_DELTA, delta)
        assert max_epsilon is not None
        if not max_epsilon > 0:
            raise SiteConfigError(
                f"{site_dir / SITE_SETTINGS_FILE}: {NODE_MAX_EPSILON!r} must be > 0, got {max_epsilon}"
            )
        if delta is not None and not 0.0 < delta < 1.0:
            raise SiteConfigError(f"{site_dir / SITE_SETTINGS_FILE}: {NODE_DELTA!r} must be in (0, 1), got {delta}")
    return Site(
        site_id=site_id,
        site_dir=site_dir,
        identity_key_path=site_dir / IDENTITY_KEY_FILE,
        roster_path=Path(sim_dir) / ROSTER_FILE,
        ledger_path=site_dir / LEDGER_FILE,
        data_path=None,
        partition_id=partition_id,
        num_partitions=int(node_config.get(NODE_NUM_PARTITIONS, 0)) or None,
        device=device,
        max_epsilon=max_epsilon,
        delta=delta,
    )


def site_from_context(context: Any) -> Site:
    """The :class:`Site` of the node running ``context`` (a Flower Context): node config + the run's sim dir."""
    from shared.config import RunConfig

    cfg = RunConfig.from_flower(context.run_config)
    return site_from_node_config(context.node_config, sim_dir=cfg.simulation_dir(context.run_id))
