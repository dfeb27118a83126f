"""``privatune``: what Flower's own CLI does not do: simulate with good defaults, provision sites, audit,
serve the tuned model."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from server.serving.cli import add_serving_commands
from shared.config import ConfigError, RunConfig
from shared.tasks.presets import SIMULATED_SITES, TASK_NAMES


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
    overrides = parse_overrides(args.set or [])
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.no_dp:
        overrides["dp"] = False
    if args.no_secure_aggregation:
        overrides["secure-aggregation"] = False
    if args.output_dir:
        overrides["output-dir"] = args.output_dir
    if args.task is not None:
        overrides["task"] = args.task
    if args.device and "server-device" not in overrides:
        overrides["server-device"] = args.device  # the server evaluates where the sites train
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), **overrides})  # fail fast, before Ray starts
    return _run(args, overrides, num_clients=args.num_clients or SIMULATED_SITES[cfg.task])


def _run(args: argparse.Namespace, overrides: dict[str, Any], *, num_clients: int) -> int:
    from shared.simulation import run_simulation

    site_settings: dict[str, Any] = {}
    if args.site_max_epsilon is not None:
        site_settings["max-epsilon"] = args.site_max_epsilon
    gpus = 0.0
    if args.device:
        site_settings["device"] = args.device
        if args.device.startswith("cuda"):
            gpus = 1.0 / num_clients  # the simulated sites share one GPU
    run_simulation(  # the ServerApp ends its log with the run's summary (shared.simulation.summary)
        overrides,
        num_clients=num_clients,
        cpus_per_client=args.cpus_per_client,
        verbose=args.verbose,
        site_settings=site_settings or None,
        num_gpus_per_client=gpus,
        estimate_time=not args.no_estimate,
    )
    return 0


def _resume(args: argparse.Namespace) -> int:
    """Continue an interrupted simulation from its last checkpointed round, with its own run config."""
    from server.checkpoint import load_checkpoint

    run_dir = Path(args.run_dir).expanduser().resolve()
    ckpt = load_checkpoint(run_dir)
    if ckpt.server_round >= int(ckpt.config.get("num-server-rounds", 0)) and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metrics.get("adapters"):
            raise ValueError(f"{run_dir} finished all its {ckpt.server_round} rounds: nothing to resume")
    num_clients = args.num_clients or _sites_of(ckpt.history)
    if not num_clients:
        raise ValueError(f"cannot tell how many sites {run_dir} had: give --num-clients")
    overrides = {**ckpt.config, "resume": str(run_dir)}
    if args.output_dir:
        overrides["output-dir"] = args.output_dir
    print(f"resuming run {ckpt.run_id} after its round {ckpt.server_round} with {num_clients} sites")
    return _run(args, overrides, num_clients=num_clients)


def _sites_of(history: dict[str, Any]) -> int:
    """The number of sites a run had: those asked in round 0, or the most sampled in one round."""
    centering = history.get("feature_centering") or {}
    counts = [len(centering.get("sampled") or [])] + [len(r.get("sampled") or []) for r in history.get("rounds", [])]
    return max(counts)


def _evaluate(args: argparse.Namespace) -> int:
    from shared.evaluation import evaluate_adapter

    result = evaluate_adapter(
        args.adapter,
        args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        base_model=args.base_model,
        max_rows=args.max_rows,
    )
    print(json.dumps(result.to_json(), indent=2) if args.json else result.report())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from shared.generate import generate_text

    text = generate_text(
        Path(args.adapter),
        args.prompt,
        base_model=args.base,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        device=args.device,
    )
    print(text)
    return 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default=None,
        help="Where the simulated sites train: cpu (default), cuda, cuda:N, mps (written to each site.toml).",
    )
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per simulated client.")
    parser.add_argument("--verbose", action="store_true", help="Show Flower's and Ray's logs too.")
    parser.add_argument(
        "--no-estimate",
        action="store_true",
        help="Skip the preflight's time estimate (a timed DP step on a few rows: seconds, longer for a large model).",
    )


def _provision(args: argparse.Namespace) -> int:
    from shared.identity import format_fingerprint
    from shared.provision import provision

    requests = [Path(p) for p in args.site_request]
    countersignatures = [Path(p) for p in args.countersignature or []]
    fed = provision(
        Path(args.out),
        requests,
        superlink_hosts=args.superlink_host,
        port=args.port,
        countersignatures=countersignatures,
    )
    print(f"coordinator files: {fed.coordinator_dir} (keep ca.key and superlink.key there)")
    print("site requests accepted; compare each fingerprint with that site's operator (phone, e-mail):")
    for site_id, fingerprint in sorted(fed.request_fingerprints.items()):
        print(f"  {site_id}: {format_fingerprint(fingerprint)}")
    print(f"roster fingerprint: {format_fingerprint(fed.roster_fingerprint)}")
    print("  every site approves this roster: privatune site approve-roster --site-dir <its dir> <its bundle>")
    print("  (its operators hold a roll call among themselves, reading out the roster code each one's tool shows)")
    for site_id, confirmed in sorted(fed.countersigned.items()):
        print(f"countersigned by {site_id} (its operator confirmed: {', '.join(confirmed) or 'no other site'})")
    if fed.awaiting_countersignature:
        print(
            f"awaiting the countersignature of: {', '.join(fed.awaiting_countersignature)} (no site uses the roster "
            "before every other site countersigned it): collect each site's roster-countersignature.json, run "
            "provision again with --countersignature FILE_OR_DIR, and send every site its bundle again"
        )
    else:
        print("every site countersigned this roster: send every site its bundle again (approve-roster installs them)")
    for site_id, bundle in fed.bundle_dirs.items():
        print(f"bundle for {site_id}: {bundle} (public files only)")
    print(f"register each site: flwr supernode register {fed.coordinator_dir}/node-keys/<site>.pub")
    return 0


def _site_init(args: argparse.Namespace) -> int:
    from shared.enrolment import init_site
    from shared.identity import format_fingerprint

    made = init_site(args.site_id, Path(args.out))
    print(f"site {made.request.site_id}: private keys in {made.site_dir} (mode 0600; they never leave it)")
    print(f"send this request to the coordinator: {made.request_path}")
    print(
        f"request fingerprint (read it to the coordinator's operator): {format_fingerprint(made.request.fingerprint())}"
    )
    print(f"then edit {made.site_dir / 'node-config.toml'}")
    return 0


def _site_list(values: list[str] | None) -> set[str]:
    """Site ids given as repeated and/or comma-separated options."""
    return {s.strip() for value in values or [] for s in value.split(",") if s.strip()}


def _roll_call(review: Any, given: set[str], *, ask: bool) -> set[str]:
    """The other sites whose operators read out this roster's code: ``given``, and, at a terminal, each one the
    operator answers yes for."""
    unknown = sorted(given - set(review.others))
    if unknown:
        raise ValueError(f"--confirmed {unknown}: not other sites of this roster ({', '.join(review.others)})")
    confirmed = set(given)
    for site in review.others:
        if ask and site not in confirmed:
            answer = input(f"Did the operator of {site} read out this same roster code? Type 'yes' or 'no': ")
            if answer.strip().lower() == "yes":
                confirmed.add(site)
    return confirmed


def _print_countersignatures(site_dir: Path, pin: Any) -> None:
    from shared.enrolment import held_countersignatures

    _, missing = held_countersignatures(site_dir, pin)
    if missing:
        print(
            f"this site refuses every round until it holds the countersignature of: {', '.join(missing)} (when the "
            "coordinator sends the bundle with them, run this command again)"
        )
    else:
        print("every other site countersigned this roster")


def _site_approve_roster(args: argparse.Namespace) -> int:
    from shared.countersignature import COUNTERSIGNATURE_FILE
    from shared.enrolment import approve_roster, review_roster
    from shared.identity import ROSTER_PIN_FILE, format_fingerprint

    review = review_roster(Path(args.site_dir), Path(args.roster), expected_fingerprint=args.fingerprint)
    print(f"roster {review.source} for site {review.site_id}: {len(review.roster.keys)} site(s)")
    for line in review.roster.describe():
        print(f"  {line}")
    print(f"roster fingerprint: {format_fingerprint(review.fingerprint)}")
    print(f"roster code: {review.roster.code()}")
    if review.unchanged:
        assert review.previous is not None
        # the same roster: the bundle's CA certificate, address and countersignatures are (re)installed
        pin = approve_roster(review, confirmed=review.previous.confirmed)
        print("this is the roster already approved; the bundle's other files are installed")
        _print_countersignatures(review.site_dir, pin)
        return 0
    if review.previous is not None and review.previous.fingerprint == review.fingerprint:
        print(f"it is the roster approved at {review.previous.approved_at}, without a roll call for every site")
    elif review.previous is not None:
        print(f"it REPLACES the roster approved at {review.previous.approved_at}:")
        for change in review.changes:
            print(f"  {change}")
    if review.others:
        print(
            f"Roll call: on a call with the operators of {', '.join(review.others)} (people you recognise, reached "
            "by numbers you know, not through the coordinator), each reads out the roster code their own "
            "approve-roster shows. Confirm a site only if its operator read out this same code."
        )
    if not args.yes and not sys.stdin.isatty():
        raise ValueError(
            "approving a roster needs its operator: run interactively, or pass --confirmed SITE for every site "
            "whose operator read out this roster code, and --yes"
        )
    confirmed = _roll_call(review, _site_list(args.confirmed), ask=not args.yes)
    unconfirmed = [s for s in review.others if s not in confirmed]
    if unconfirmed:
        print(
            f"not approved: no operator read out this roster code for {', '.join(unconfirmed)}. A site nobody on "
            "the call speaks for may be the coordinator's own, and one whose operator read out another code was "
            "shown another roster: tell the other operators and the coordinator. Nothing changed."
        )
        return 1
    if not args.yes:
        answer = input("Approve this roster for this site? Type 'yes': ")
        if answer.strip().lower() != "yes":
            print("not approved; nothing changed")
            return 1
    pin = approve_roster(review, confirmed=confirmed)
    print(f"approved and pinned: {review.site_dir / ROSTER_PIN_FILE} ({len(pin.sites)} sites)")
    print(f"countersigned: send {review.site_dir / COUNTERSIGNATURE_FILE} to the coordinator (it is public)")
    _print_countersignatures(review.site_dir, pin)
    return 0


def _site_approve_app(args: argparse.Namespace) -> int:
    from shared.app_approval import approve_app, review_app
    from shared.identity import format_fingerprint

    review = review_app(Path(args.site_dir), Path(args.app))
    app = review.app
    print(f"app {app.fab_id} {app.version} from {review.source}: {len(app.files)} files")
    print(
        f"FAB sha256: {format_fingerprint(app.sha256)} (flwr build names the file with its first 8: {app.sha256[:8]})"
    )
    if review.already is not None:
        print(f"this app is already approved (at {review.already.approved_at}); nothing to do")
        return 0
    previous = review.previous
    if previous is None:
        print("no app was approved at this site before: every file is new. Review them:")
        for path, data in sorted(app.files.items()):
            print(f"  {path} ({len(data)} bytes)")
    else:
        print(
            f"against the app approved at {previous.approved_at} ({previous.fab_id} {previous.version}, "
            f"FAB sha256 {previous.fab_sha256[:8]}):"
        )
        for change in review.changes or ["no file changed (the same files in another archive)"]:
            print(f"  {change}")
        diff = review.diff()
        if diff is None:
            print("(no copy of the app approved before is kept: no line-by-line diff; files compared by hash)")
        else:
            sys.stdout.write("".join(diff))
    if not args.yes:
        if not sys.stdin.isatty():
            raise ValueError(
                "approving an app needs its operator: run interactively, or pass --yes once you have reviewed it"
            )
        answer = input("Approve this app: let this site run it? Type 'yes': ")
        if answer.strip().lower() != "yes":
            print("not approved; nothing changed")
            return 1
    approval = approve_app(review)
    print(
        f"approved and recorded: {review.site_dir / 'app-approvals.jsonl'} (FAB sha256 {approval.fab_sha256[:8]}); "
        "a running SuperNode runs it from its next run on"
    )
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from shared.app_approval import AppApprovals
    from shared.identity import ROSTER_PIN_FILE, RosterPin, format_fingerprint
    from shared.provision import check_bundle

    site_dir = check_bundle(Path(args.bundle))
    pin = RosterPin.load(site_dir / ROSTER_PIN_FILE)
    print(f"site directory {site_dir} is complete")
    print(
        f"roster pinned: {format_fingerprint(pin.fingerprint)} ({len(pin.sites)} sites: {', '.join(pin.sites)}; "
        f"approved {pin.approved_at}; confirmed at the roll call and countersigned by every other site)"
    )
    approvals = AppApprovals.load(site_dir, pin.site_id)
    print(f"apps approved: {len(approvals.approvals)}; the SuperNode runs only these:")
    for approval in approvals.approvals:
        print(f"  {approval.fab_sha256[:8]} {approval.fab_id} {approval.version} (approved {approval.approved_at})")
    return 0


def _site_accept_ledger(args: argparse.Namespace) -> int:
    import tomllib

    from shared.identity import load_private_key
    from shared.ledger_override import accept_ledger, review_ledger
    from shared.provision import NODE_CONFIG_FILE
    from shared.site import site_from_node_config

    site_dir = Path(args.site_dir).expanduser().resolve()
    site = site_from_node_config(tomllib.loads((site_dir / NODE_CONFIG_FILE).read_text()), sim_dir=site_dir)
    key = load_private_key(site.identity_key_path)
    problem = review_ledger(
        site.ledger_path,
        site_id=site.site_id,
        signing_key=key,
        witness_path=site.witness_path,
        head_path=site.ledger_head_path,
        proof_of_use=site.fingerprint_key_path,
    )
    if problem is None:
        print(f"nothing to accept: site {site.site_id} releases from its ledger {site.ledger_path} as it is")
        return 1
    print(f"site {site.site_id} refuses its ledger {site.ledger_path}:\n  {problem}")
    print(
        "Restore the latest ledger and head record if you can. Accepting the ledger as it is goes on without the "
        "releases it lost: no epsilon of this site counts them from now on. The decision and your reason are "
        "recorded in the ledger, and every audit of it reports them."
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise ValueError("accepting a ledger needs its operator: run interactively, or pass --yes")
        if input("Accept this ledger as it is? Type 'yes': ").strip().lower() != "yes":
            print("not accepted; nothing changed")
            return 1
    override = accept_ledger(
        site.ledger_path,
        site_id=site.site_id,
        signing_key=key,
        reason=args.reason,
        witness_path=site.witness_path,
        head_path=site.ledger_head_path,
        proof_of_use=site.fingerprint_key_path,
    )
    print(
        f"recorded as entry {override.seq} of {site.ledger_path}: {override.entries_found} entries kept, at least "
        f"{override.lost} release(s) lost as far as the head record and witness tell; the site releases again"
    )
    return 0


def _superlink_address(site_dir: Path, given: str | None) -> str:
    import tomllib

    from shared.provision import CONNECTION_FILE

    if given:
        return given
    path = site_dir / CONNECTION_FILE
    if not path.is_file():
        raise ValueError(f"no --superlink given and no {path} (it comes in the coordinator's bundle)")
    address = tomllib.loads(path.read_text()).get("superlink")
    if not isinstance(address, str) or not address:
        raise ValueError(f'{path} must set superlink = "host:port"')
    return address


def _site_start(args: argparse.Namespace) -> int:
    import os

    from shared.provision import QUIET_FLOWER_ENV, supernode_command

    superlink = _superlink_address(Path(args.bundle), args.superlink)
    command = supernode_command(Path(args.bundle), superlink, runtime_port=args.runtime_port)
    os.execvpe(command[0], command, {**os.environ, **QUIET_FLOWER_ENV})
    return 0  # pragma: no cover  (exec does not return)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privatune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="Simulate a private federation on this machine.")
    sim.add_argument(
        "--num-clients", type=int, default=None, help="Simulated sites (default 10; 3 with --task causal-lm)."
    )
    sim.add_argument("--rounds", type=int, default=None, help="Override num-server-rounds.")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override any run-config key.")
    sim.add_argument(
        "--task",
        choices=TASK_NAMES,
        default=None,
        help="What is fine-tuned: classify (default) or causal-lm; sets the run config's task (and its presets).",
    )
    sim.add_argument("--no-dp", action="store_true", help="Non-private baseline (loudly marked).")
    sim.add_argument("--no-secure-aggregation", action="store_true", help="Plain aggregation (loudly marked).")
    sim.add_argument(
        "--site-max-epsilon",
        type=float,
        default=None,
        help="Every simulated site's own budget (written to its site.toml; the server never sees it).",
    )
    sim.add_argument("--output-dir", default=None, help="Where run-<id>/ goes (default: runs).")
    _add_run_options(sim)
    sim.set_defaults(func=_simulate)

    res = sub.add_parser(
        "resume", help="Continue an interrupted simulation from its last completed round (same config, same sites)."
    )
    res.add_argument("run_dir", metavar="RUN_DIR", help="The interrupted run's directory (runs/run-<id>).")
    res.add_argument("--num-clients", type=int, default=None, help="Simulated sites (default: as the run had).")
    res.add_argument(
        "--site-max-epsilon", type=float, default=None, help="Every simulated site's own budget (site.toml)."
    )
    res.add_argument("--output-dir", default=None, help="Where the new run-<id>/ goes (default: the run's).")
    _add_run_options(res)
    res.set_defaults(func=_resume)

    ev = sub.add_parser(
        "evaluate",
        help="A saved adapter's metrics on a file, next to the baseline (a classifier's: each label's recall and "
        "the confusion matrix; a causal LM's: loss, perplexity, exact match).",
    )
    ev.add_argument("--adapter", required=True, help="An adapter directory (runs/run-<id>/adapter or adapter-best).")
    ev.add_argument(
        "--data",
        required=True,
        help="A classifier's: a .csv / .jsonl / .parquet file with text and label columns; a causal LM's: a .jsonl "
        "file of prompt/response, messages or text rows.",
    )
    ev.add_argument("--text-column", default=None, help="A classifier's column of the texts (default: text).")
    ev.add_argument("--label-column", default=None, help="A classifier's column of the labels (default: label).")
    ev.add_argument("--base-model", default=None, help="Where the base model lives here (default: the card's).")
    ev.add_argument("--max-rows", type=int, default=None, help="Score only the first N rows.")
    ev.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    ev.set_defaults(func=_evaluate)

    gen = sub.add_parser(
        "generate", help="Greedy text from a saved causal-LM adapter (plain transformers + peft load)."
    )
    gen.add_argument("--adapter", required=True, help="A causal-LM adapter directory (runs/run-<id>/adapter).")
    gen.add_argument("--prompt", required=True, help="The text to continue (encoded as training encoded prompts).")
    gen.add_argument("--base", default=None, help="Where the base model lives here (default: the card's).")
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="Stop after this many tokens (or at the eos token; default 64)."
    )
    gen.add_argument("--chat", action="store_true", help="Send the prompt as one user message in the chat template.")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps.")
    gen.set_defaults(func=_generate)

    prov = sub.add_parser(
        "provision",
        help="Coordinator: CA, SuperLink TLS certificate, roster and bundles from the sites' requests "
        "(re-run to add sites).",
    )
    prov.add_argument("--out", required=True, help="Directory for coordinator/ and bundles/<id>/.")
    prov.add_argument(
        "--site-request",
        action="append",
        required=True,
        metavar="FILE_OR_DIR",
        help="A site's site-request.json (from privatune site init), or a directory of them (repeatable).",
    )
    prov.add_argument(
        "--countersignature",
        action="append",
        metavar="FILE_OR_DIR",
        help="A site's roster-countersignature.json (from site approve-roster), or a directory of them "
        "(repeatable): checked, kept, and put into every bundle.",
    )
    prov.add_argument(
        "--superlink-host",
        action="append",
        required=True,
        help="Name or IP the sites reach the SuperLink at (repeatable; the first goes into flwr-config.toml).",
    )
    prov.add_argument("--port", type=int, default=9092, help="The SuperLink's port (default 9092).")
    prov.set_defaults(func=_provision)

    site = sub.add_parser(
        "site",
        help="Partner site: make its keys, approve the roster and the app, check its directory, start its SuperNode.",
    )
    site_sub = site.add_subparsers(dest="site_command", required=True)
    init = site_sub.add_parser(
        "init", help="Make this site's private keys and the request (public keys only) for the coordinator."
    )
    init.add_argument("--site-id", required=True, help="This site's id, as agreed with the coordinator.")
    init.add_argument("--out", required=True, help="This site's directory (created with mode 0700).")
    init.set_defaults(func=_site_init)
    approve = site_sub.add_parser(
        "approve-roster",
        help="Show the coordinator's roster and its code, check this site's entry, hold the roll call with the "
        "other sites' operators, then pin and countersign it (run again on a bundle with the countersignatures).",
    )
    approve.add_argument("--site-dir", required=True, help="This site's directory (from site init).")
    approve.add_argument("roster", help="The coordinator's bundle directory for this site, or a roster.json.")
    approve.add_argument(
        "--fingerprint", default=None, help="The roster fingerprint the coordinator told you; refused if different."
    )
    approve.add_argument(
        "--confirmed",
        action="append",
        metavar="SITE[,SITE...]",
        help="A site whose operator read out this same roster code to you (repeatable); every other site must be.",
    )
    approve.add_argument(
        "--yes", action="store_true", help="Approve without asking (every other site given in --confirmed)."
    )
    approve.set_defaults(func=_site_approve_roster)
    approve_app = site_sub.add_parser(
        "approve-app",
        help="Show an app (FAB) and what changed since the app approved last, and record this site's approval.",
    )
    approve_app.add_argument("--site-dir", required=True, help="This site's directory (from site init).")
    approve_app.add_argument(
        "app", help="The app: the .fab the coordinator sent (flwr build), or an app directory (built as flwr run does)."
    )
    approve_app.add_argument("--yes", action="store_true", help="Approve without asking (you reviewed it).")
    approve_app.set_defaults(func=_site_approve_app)
    check = site_sub.add_parser(
        "check", help="Check the site directory: files, key permissions, node config, approved roster and apps."
    )
    check.add_argument("bundle", help="The site directory.")
    check.set_defaults(func=_site_check)
    accept = site_sub.add_parser(
        "accept-ledger",
        help="Go on from a ledger the site refuses (restored from an older copy or deleted), recording why in it.",
    )
    accept.add_argument("site_dir", help="The site directory (its node-config.toml names the ledger).")
    accept.add_argument("--reason", required=True, help="Why the ledger is accepted as it is (recorded in it).")
    accept.add_argument("--yes", action="store_true", help="Accept without asking (you read what is lost).")
    accept.set_defaults(func=_site_accept_ledger)
    start = site_sub.add_parser(
        "start",
        help="Check the site directory, then run its SuperNode: only approved apps run (Flower phone-home off).",
    )
    start.add_argument("bundle", help="The site directory.")
    start.add_argument(
        "--superlink", default=None, help="The SuperLink's host:port (default: the bundle's connection.toml)."
    )
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
