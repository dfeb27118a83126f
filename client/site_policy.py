"""What a deployed site refuses to let the server decide.

A deployed site (node config has ``site-id``) takes its data path, columns and label set, device, budget
(``max-epsilon``, ``delta``, ``accountant``, ``data-source``) and ledger path from its own node config only.
The run config comes from the server, so a run config that tries to set one of those differently is refused
before anything is read or trained; the reason goes back to the server as the round's decline reason (and
into the server's log). The run-config keys that count as site-owned in a deployment:

- ``data-path``: must be the task's default (then it only names the server's data) or the site's own data path;
- ``sim-dir``: simulation only, must be empty;
- ``target-epsilon``: must not exceed the site's ``max-epsilon``;
- ``delta``: must not exceed the site's ``delta`` (the site accounts at its own delta and accountant whatever
  the run config says; a looser one is refused so that the server does not believe a weaker guarantee);
- ``task``: must be the site's own ``task`` (node config, default ``classify``): a server must not get a site's
  rows read, trained on and released under another task than the one its operator declared;
- ``labels``: must be the site's ``labels``, in the same order (the class order is part of the model: a
  permuted list would train the head on swapped classes);
- ``dp = false``: refused unless the site has no budget (``max-epsilon`` unset);
- ``reproducible-noise = true``: refused unless the site's node config sets ``allow-reproducible-noise = true``
  (the server could then recompute the noise: for tests and experiments only).

The run config's ``text-column``, ``label-column`` and ``accountant`` are not refused but ignored by a deployed
site: the columns name those of the server's own files (its evaluation file may differ from the site's), and
epsilon is always composed with the site's own accountant.

Simulated sites are not checked: in a simulation one party plays every role.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.distributed_dp import NODE_BUDGET_GUARANTEE, NODE_MIN_SURVIVORS
from shared.secagg.constants import NODE_MIN_COHORT, NODE_REQUIRE_SECAGG, NODE_THRESHOLD_FRACTION
from shared.site import (
    NODE_ACCOUNTANT,
    NODE_ALLOW_EVALUATE,
    NODE_DATA_PATH,
    NODE_DATA_SOURCE,
    NODE_DELTA,
    NODE_DEVICE,
    NODE_EVALUATE_NOISE,
    NODE_LABEL_COLUMN,
    NODE_LABELS,
    NODE_LEDGER,
    NODE_LEDGER_HEAD,
    NODE_LEDGER_WITNESS,
    NODE_MAX_EPSILON,
    NODE_ROSTER,
    NODE_SITE_DIR,
    NODE_SITE_ID,
    NODE_TASK,
    NODE_TEXT_COLUMN,
    Site,
    SiteConfigError,
)

NODE_ALLOW_REPRODUCIBLE_NOISE = "allow-reproducible-noise"
DEPLOYED_NODE_KEYS = frozenset(
    {
        NODE_SITE_ID,
        NODE_SITE_DIR,
        NODE_DATA_PATH,
        NODE_DEVICE,
        NODE_MAX_EPSILON,
        NODE_DELTA,
        NODE_LEDGER,
        NODE_LEDGER_HEAD,
        NODE_LEDGER_WITNESS,
        NODE_ROSTER,
        NODE_REQUIRE_SECAGG,
        NODE_ALLOW_REPRODUCIBLE_NOISE,
        NODE_MIN_COHORT,
        NODE_THRESHOLD_FRACTION,
        NODE_ACCOUNTANT,
        NODE_DATA_SOURCE,
        NODE_TEXT_COLUMN,
        NODE_LABEL_COLUMN,
        NODE_LABELS,
        NODE_ALLOW_EVALUATE,
        NODE_EVALUATE_NOISE,
        NODE_TASK,
        NODE_MIN_SURVIVORS,  # distributed DP noise (docs/distributed-dp.md)
        NODE_BUDGET_GUARANTEE,
    }
)


class SitePolicyError(ValueError):
    """The run config asks a deployed site for something only the site decides."""


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """A deployed site's node config may only hold known keys (a typo must not silently drop a setting)."""
    unknown = sorted(set(node_config) - DEPLOYED_NODE_KEYS)
    if unknown:
        raise SiteConfigError(f"node config has unknown key(s) {unknown}; known keys: {sorted(DEPLOYED_NODE_KEYS)}")
    allow = node_config.get(NODE_ALLOW_REPRODUCIBLE_NOISE, False)
    if not isinstance(allow, bool):
        raise SiteConfigError(f"node config {NODE_ALLOW_REPRODUCIBLE_NOISE!r} must be true or false, got {allow!r}")


def _same_path(a: str, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def site_policy_violations(cfg: RunConfig, site: Site, node_config: Mapping[str, Any]) -> list[str]:
    """Every way the run config oversteps the site's own settings (empty: the run is acceptable)."""
    if site.simulated:
        return []
    check_node_config(node_config)
    found = []
    if cfg.task != site.task:
        found.append(
            f"run config task={cfg.task!r}, but this site's data is for task={site.task!r} (node config "
            f"{NODE_TASK!r}); it is never read under another task"
        )
    default_data = RunConfig(task=cfg.task).data_path  # the task's default: it only names the server's data
    if cfg.data_path != default_data and not (site.data_path and _same_path(cfg.data_path, site.data_path)):
        found.append(f"run config data-path={cfg.data_path!r}, but this site trains only on its own data-path")
    if cfg.sim_dir:
        found.append(f"run config sim-dir={cfg.sim_dir!r} is for simulations; this site keeps its own files")
    if cfg.dp and cfg.target_epsilon > site.max_epsilon:
        found.append(
            f"run config target-epsilon={cfg.target_epsilon:g} exceeds this site's max-epsilon={site.max_epsilon:g}"
        )
    if site.delta is not None and cfg.delta > site.delta:
        found.append(f"run config delta={cfg.delta:g} exceeds this site's delta={site.delta:g}")
    if site.labels is not None and tuple(cfg.label_names or ()) != site.labels:
        found.append(
            f"run config labels={cfg.labels!r} differs from this site's labels={','.join(site.labels)!r} "
            "(the class order is part of the model)"
        )
    if not cfg.dp and math.isfinite(site.max_epsilon):
        found.append(f"run config dp=false (epsilon = inf) exceeds this site's max-epsilon={site.max_epsilon:g}")
    if cfg.dp and cfg.reproducible_noise and node_config.get(NODE_ALLOW_REPRODUCIBLE_NOISE) is not True:
        found.append(
            "run config reproducible-noise=true lets the server recompute the DP noise; this site does not set "
            f"{NODE_ALLOW_REPRODUCIBLE_NOISE} = true"
        )
    return found


def check_site_policy(cfg: RunConfig, site: Site, node_config: Mapping[str, Any]) -> None:
    """Raise :class:`SitePolicyError` naming every site-owned setting the run config tries to override."""
    found = site_policy_violations(cfg, site, node_config)
    if found:
        raise SitePolicyError(f"site {site.site_id} refuses the run: " + "; ".join(found))
