"""A site's own secure-aggregation limits come from its node config (or a simulated site's site.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_policy import DEPLOYED_NODE_KEYS, check_node_config
from shared.secagg.constants import NODE_MIN_COHORT, NODE_THRESHOLD_FRACTION
from shared.site import SiteConfigError, site_from_node_config, write_site_settings


def _deployed(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "site-id": "hospital-a",
        "site-dir": str(tmp_path),
        "data-path": str(tmp_path / "d.csv"),
        "delta": 1e-5,
        "accountant": "prv",
        "labels": "neg,pos",
        **extra,
    }


def test_the_defaults_are_three_sites_and_two_thirds(tmp_path: Path) -> None:
    site = site_from_node_config(_deployed(tmp_path), sim_dir=tmp_path)
    assert (site.secagg_min_cohort, site.secagg_threshold_fraction) == (3, 2 / 3)


def test_a_deployed_site_sets_its_limits_in_its_node_config(tmp_path: Path) -> None:
    config = _deployed(tmp_path, **{NODE_MIN_COHORT: 5, NODE_THRESHOLD_FRACTION: 0.75})
    check_node_config(config)  # known keys
    site = site_from_node_config(config, sim_dir=tmp_path)
    assert (site.secagg_min_cohort, site.secagg_threshold_fraction) == (5, 0.75)
    assert {NODE_MIN_COHORT, NODE_THRESHOLD_FRACTION} <= DEPLOYED_NODE_KEYS


def test_a_simulated_site_sets_its_limits_in_site_toml(tmp_path: Path) -> None:
    write_site_settings(tmp_path / "sites" / "site-1", {NODE_MIN_COHORT: 4, NODE_THRESHOLD_FRACTION: 0.8})
    site = site_from_node_config({"partition-id": 1, "num-partitions": 3}, sim_dir=tmp_path)
    assert (site.secagg_min_cohort, site.secagg_threshold_fraction) == (4, 0.8)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (NODE_MIN_COHORT, 1, "node config 'secagg-min-cohort' must be an int >= 2, got 1"),
        (NODE_MIN_COHORT, "3", "node config 'secagg-min-cohort' must be an int >= 2, got '3'"),
        (
            NODE_THRESHOLD_FRACTION,
            0.5,
            "node config 'secagg-threshold-fraction' must be a number in \\[2/3, 1\\], got 0.5",
        ),
        (NODE_THRESHOLD_FRACTION, 1.2, "must be a number in \\[2/3, 1\\], got 1.2"),
    ],
)
def test_bad_limits_are_refused_with_the_key_named(tmp_path: Path, key: str, value: object, message: str) -> None:
    with pytest.raises(SiteConfigError, match=message):
        site_from_node_config(_deployed(tmp_path, **{key: value}), sim_dir=tmp_path)


def test_a_bad_limit_in_site_toml_names_the_file(tmp_path: Path) -> None:
    site_dir = tmp_path / "sites" / "site-0"
    write_site_settings(site_dir, {NODE_MIN_COHORT: 0})
    with pytest.raises(SiteConfigError, match=f"{site_dir / 'site.toml'} 'secagg-min-cohort' must be an int >= 2"):
        site_from_node_config({"partition-id": 0, "num-partitions": 3}, sim_dir=tmp_path)
