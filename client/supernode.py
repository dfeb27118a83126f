"""The site's SuperNode: Flower's ``flower-supernode``, whose own app check admits only the apps this site's
operator approved (``privatune site approve-app``, ``shared/app_approval.py``).

``privatune site start`` runs ``python -m client.supernode --site-dir DIR <flower-supernode arguments>
--trusted-entities DIR/trusted-entities.yaml``. Flower's SuperNode, when a run's first message arrives, fetches
the run's FAB from the SuperLink and, with ``--trusted-entities``, verifies it before it stores it or starts any
process for it (``flwr.supernode.start_client_internal._pull_and_store_message``): a FAB without a valid
signature by a trusted key gets an error reply (``INVALID_FAB``) and never runs. The signatures it checks come
with the FAB from the SuperLink, and a self-hosted SuperLink sends none for an app started with ``flwr run``
(it attaches them only to apps it downloads from Flower's platform). Here the FAB's verifications are replaced,
as it arrives, by this site's own (:meth:`shared.app_approval.AppApprovals.verifications`, read afresh for each
new run): the record of the operator's approval, signed by the site's approval key, the only trusted entity.
Nothing the SuperLink sends can add a signature, and an app without an approval is refused by Flower's check,
with this site's reason logged first (the app, and the files that differ from the app approved last), and the
FAB kept in ``offered-apps/`` for the operator to review.

Should the hook below ever not be reached (a Flower whose SuperNode fetches FABs another way), the check still
fails closed: Flower then sees the SuperLink's verifications, which for a self-hosted federation hold no
signature by this site's key, and refuses every app.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.app_approval import (
    APPROVE_APP_COMMAND,
    LICENSE_VALUE,
    LICENSE_VERIFICATION,
    TRUSTED_ENTITIES_FILE,
    AppApprovalError,
    AppApprovals,
    keep_offered_app,
    sha256_hex,
    write_trusted_entities,
)

logger = logging.getLogger("flwr")  # Flower's logger: the SuperNode's log is where its operator looks
TRUSTED_ENTITIES_FLAG = "--trusted-entities"
# Flower's error reply for a FAB its check refused ("The FAB could not be verified."), as the coordinator sees it
REFUSED_REASON = (
    "The FAB could not be verified: this site runs only apps its operator approved (privatune site approve-app)"
)


class SuperNodeGuardError(RuntimeError):
    """The Flower SuperNode cannot be run so that it checks the site's app approvals."""


def approved_fab(site_dir: Path, site_id: str, get_fab: Callable[[str, int], Any]) -> Callable[[str, int], Any]:
    """``get_fab`` whose FAB carries this site's own verifications instead of the SuperLink's."""
    from flwr.supercore.fab import Fab

    def fetch(fab_hash: str, run_id: int) -> Fab:
        fab = get_fab(fab_hash, run_id)
        try:
            approvals = AppApprovals.load(site_dir, site_id)  # read afresh: approvals made since start count
            verifications = approvals.verifications(fab.content)
        except AppApprovalError as e:
            logger.error("run %s: refusing its app: this site's app approvals cannot be read: %s", run_id, e)
            return Fab(fab.hash_str, fab.content, {LICENSE_VERIFICATION: LICENSE_VALUE})  # and no signature
        fab_sha256 = sha256_hex(fab.content)
        if approvals.find(fab_sha256) is None:
            try:
                offered = str(keep_offered_app(site_dir, fab.content))
            except OSError as e:
                offered = f"<its .fab: not kept here ({e})>"
            logger.error(
                "run %s: refusing its app, none of which runs: %s. To review it: %s --site-dir %s %s",
                run_id,
                approvals.refusal(fab.content),
                APPROVE_APP_COMMAND,
                site_dir,
                offered,
            )
        else:
            logger.info("run %s: app FAB sha256 %s is approved by this site's operator", run_id, fab_sha256)
        return Fab(fab.hash_str, fab.content, verifications)

    return fetch


def guard_supernode(site_dir: Path, site_id: str) -> None:
    """Feed Flower's SuperNode's FAB check with this site's approvals (see the module docstring)."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode
    from flwr.supernode import start_client_internal as node

    pull = getattr(node, "_pull_and_store_message", None)
    params = inspect.signature(pull).parameters if callable(pull) else {}
    if not {"get_fab", "trusted_entities"} <= set(params) or not hasattr(node, "FAB_VERIFICATION_ERROR"):
        raise SuperNodeGuardError(
            "this Flower's SuperNode does not fetch and verify FABs as Flower 1.41 does "
            "(flwr.supernode.start_client_internal._pull_and_store_message): refusing to start without the app check"
        )
    assert pull is not None

    def pull_and_store_message(**kwargs: Any) -> Any:
        if not kwargs.get("trusted_entities"):
            raise SuperNodeGuardError("the SuperNode runs without --trusted-entities: refusing every message")
        kwargs["get_fab"] = approved_fab(site_dir, site_id, kwargs["get_fab"])
        return pull(**kwargs)

    node._pull_and_store_message = pull_and_store_message  # type: ignore[assignment]
    node.FAB_VERIFICATION_ERROR = Error(ErrorCode.INVALID_FAB, REFUSED_REASON)  # type: ignore[attr-defined]


def _trusted_entities_arg(flower_args: list[str]) -> Path | None:
    for i, arg in enumerate(flower_args):
        if arg == TRUSTED_ENTITIES_FLAG and i + 1 < len(flower_args):
            return Path(flower_args[i + 1])
        if arg.startswith(TRUSTED_ENTITIES_FLAG + "="):
            return Path(arg.split("=", 1)[1])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode",
        description="flower-supernode that runs only the apps this site's operator approved.",
        allow_abbrev=False,
    )
    parser.add_argument("--site-dir", required=True, help="The site's directory (its approvals and key).")
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from shared.enrolment import own_request

    site_dir = Path(args.site_dir).expanduser().resolve()
    try:
        site_id = own_request(site_dir).site_id
        approvals = AppApprovals.load(site_dir, site_id)  # a log that does not verify: refuse to start
        trusted = _trusted_entities_arg(flower_args)
        if trusted is None or trusted.expanduser().resolve() != site_dir / TRUSTED_ENTITIES_FILE:
            raise SuperNodeGuardError(f"give {TRUSTED_ENTITIES_FLAG} {site_dir / TRUSTED_ENTITIES_FILE}")
        write_trusted_entities(approvals)  # exactly the approval key; refused if no app is approved yet
        guard_supernode(site_dir, site_id)
    except (SuperNodeGuardError, ValueError) as e:
        print(f"privatune site start: error: {e}", file=sys.stderr)
        return 2

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
