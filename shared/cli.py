"""``privatune``: what Flower's own CLI does not do: simulate with good defaults, provision sites, audit,
serve the tuned model."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from server.serving.cli import add_serving_commands
from shared.config import ConfigError, RunConfig


def _parse_value(raw: str) -> Any:
    """A TOML scalar (1, 0.5, true, "x") or, failing that, the bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = RunConfig().to_flower()
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set takes key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in known:
            raise ConfigError(f"unknown run-config key {key!r}; known keys: {sorted(known)}")
        out[key] = _parse_value(raw.strip())
    return out


def _simulate(args: argparse.Namespace) -> int:
    from shared.simulation import run_simulation, summary

    overrides = parse_overrides(args.set or [])
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.no_dp:
        overrides["dp"] = False
    if args.no_secure_aggregation:
        overrides["secure-aggregation"] = False
    if args.output_dir:
        overrides["output-dir"] = args.output_dir
    RunConfig.from_flower({**RunConfig().to_flower(), **overrides})  # fail fast, before Ray starts
    site_settings = {"max-epsilon": args.site_max_epsilon} if args.site_max_epsilon is not None else None
    run_dir = run_simulation(
        overrides,
        num_clients=args.num_clients,
        cpus_per_client=args.cpus_per_client,
        verbose=args.verbose,
        site_settings=site_settings,
    )
    print(summary(run_dir))
    return 0


def _provision(args: argparse.Namespace) -> int:
    from shared.provision import provision

    sites = [x.strip() for x in args.sites.split(",") if x.strip()]
    fed = provision(Path(args.out), sites, superlink_hosts=args.superlink_host, port=args.port)
    print(f"coordinator files: {fed.coordinator_dir} (keep ca.key and superlink.key there)")
    for site_id, site_dir in fed.site_dirs.items():
        print(f"site bundle for {site_id}: {site_dir} (send it to {site_id} over a secure channel)")
    print(f"register each site: flwr supernode register {fed.coordinator_dir}/node-keys/<site>.pub")
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from shared.provision import check_bundle

    print(f"site bundle {check_bundle(Path(args.bundle))} is complete")
    return 0


def _site_start(args: argparse.Namespace) -> int:
    import os

    from shared.provision import QUIET_FLOWER_ENV, supernode_command

    command = supernode_command(Path(args.bundle), args.superlink, runtime_port=args.runtime_port)
    os.execvpe(command[0], command, {**os.environ, **QUIET_FLOWER_ENV})
    return 0  # pragma: no cover  (exec does not return)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privatune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="Simulate a private federation on this machine.")
    sim.add_argument("--num-clients", type=int, default=10, help="Simulated sites (default 10).")
    sim.add_argument("--rounds", type=int, default=None, help="Override num-server-rounds.")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override any run-config key.")
    sim.add_argument("--no-dp", action="store_true", help="Non-private baseline (loudly marked).")
    sim.add_argument("--no-secure-aggregation", action="store_true", help="Plain aggregation (loudly marked).")
    sim.add_argument(
        "--site-max-epsilon",
        type=float,
        default=None,
        help="Every simulated site's own budget (written to its site.toml; the server never sees it).",
    )
    sim.add_argument("--output-dir", default=None, help="Where run-<id>/ goes (default: runs).")
    sim.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per simulated client.")
    sim.add_argument("--verbose", action="store_true", help="Show Flower's and Ray's logs too.")
    sim.set_defaults(func=_simulate)

    prov = sub.add_parser(
        "provision",
        help="Coordinator: CA, SuperLink TLS certificate, one bundle per site (re-run to add sites).",
    )
    prov.add_argument("--out", required=True, help="Directory for coordinator/ and sites/<id>/.")
    prov.add_argument("--sites", required=True, help="Comma-separated site ids, e.g. hospital-a,hospital-b.")
    prov.add_argument(
        "--superlink-host",
        action="append",
        required=True,
        help="Name or IP the sites reach the SuperLink at (repeatable; the first goes into flwr-config.toml).",
    )
    prov.add_argument("--port", type=int, default=9092, help="The SuperLink's port (default 9092).")
    prov.set_defaults(func=_provision)

    site = sub.add_parser("site", help="Partner site: check a site bundle, or start its SuperNode.")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    check = site_sub.add_parser("check", help="Check the bundle: files, key permissions, node config, roster.")
    check.add_argument("bundle", help="The site bundle directory.")
    check.set_defaults(func=_site_check)
    start = site_sub.add_parser(
        "start", help="Check the bundle, then run flower-supernode for it (Flower phone-home off)."
    )
    start.add_argument("bundle", help="The site bundle directory.")
    start.add_argument("--superlink", required=True, help="The SuperLink's host:port.")
    start.add_argument("--runtime-port", type=int, default=9094, help="Local port of the SuperNode's own API.")
    start.set_defaults(func=_site_start)

    add_serving_commands(sub)  # predict, serve, serve-keys (server/serving/cli.py)
    # "privatune audit ..." is handed whole to the audit's own parser (see main)
    sub.add_parser("audit", help="Verify ledgers, recompute every epsilon, write the audit report (audit --help).")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit"]:
        from shared.audit.cli import audit_main

        return audit_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"privatune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
