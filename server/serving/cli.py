"""``privatune predict``, ``privatune serve`` and ``privatune serve-keys``: the tuned model in use.

Kept apart from ``shared/cli.py``'s training commands; :func:`add_serving_commands` adds them to its parser.
Heavy imports (torch, FastAPI) happen inside the commands, so ``privatune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_KEY_FILE = "serve-keys.json"


def _predict(args: argparse.Namespace) -> int:
    from shared.predict import load_classifier

    texts = list(args.text or [])
    if args.input:
        texts += [line for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SystemExit("privatune predict: give --text (repeatable) or --input FILE (one text per line)")
    classifier = load_classifier(args.adapter, base_model=args.base_model)
    print(json.dumps({"predictions": classifier.predict(texts)}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from server.monitoring import MetricsEndpoint
    from server.serving.app import ENDPOINTS, ServeLimits, create_app
    from server.serving.keys import KeyStore
    from server.serving.metrics import ServeMetrics
    from server.serving.service import serve_forever
    from shared.log import configure_logging
    from shared.predict import load_classifier

    configure_logging()
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, rate=args.rate_limit, burst=args.burst
    )
    keys = KeyStore(Path(args.keys))  # fails here, before the model loads, if the key file is missing or bad
    if not keys.active_names:
        logging.getLogger("privatune").warning(
            "%s has no active key: every predict request will be refused until one is created", args.keys
        )
    if args.access_log:
        handler = logging.FileHandler(args.access_log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("privatune.access").addHandler(handler)
    classifier = load_classifier(args.adapter, base_model=args.base_model)
    metrics = ServeMetrics(endpoints=ENDPOINTS, labels=classifier.label_names)
    app = create_app(classifier, keys, limits=limits, metrics=metrics)
    endpoint = MetricsEndpoint(metrics.registry, port=args.metrics_port) if args.metrics_port else None
    if endpoint is not None:
        logging.getLogger("privatune").info(
            "service metrics (Prometheus) on http://%s:%d/metrics", endpoint.host, endpoint.port
        )
    tls_cert = Path(args.tls_cert) if args.tls_cert else None
    tls_key = Path(args.tls_key) if args.tls_key else None
    try:
        serve_forever(app, host=args.host, port=args.port, tls_cert=tls_cert, tls_key=tls_key)
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from server.serving.keys import create_key

    token = create_key(Path(args.keys), args.name)
    print(f"API key {args.name!r} added to {args.keys}; it is shown only now:", file=sys.stderr)
    print(token)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from server.serving.keys import revoke_key

    key = revoke_key(Path(args.keys), args.name)
    print(f"revoked API key {key.name!r} at {key.revoked} (a running service refuses it from its next request)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from server.serving.keys import describe, read_keys

    rows = describe(read_keys(Path(args.keys)))
    if not rows:
        print(f"no keys in {args.keys}")
    for row in rows:
        revoked = f"  revoked {row['revoked']}" if row["revoked"] else ""
        print(f"{row['name']:<24} {row['state']:<8} created {row['created']}{revoked}")
    return 0


def add_serving_commands(sub: Any) -> None:
    """Add ``predict``, ``serve`` and ``serve-keys`` to the ``privatune`` subcommand parser ``sub``."""
    pred = sub.add_parser("predict", help="Classify texts with a run's adapter (what serve answers, as JSON).")
    pred.add_argument("--adapter", required=True, help="The adapter directory (runs/run-<id>/adapter).")
    pred.add_argument("--text", action="append", help="A text to classify (repeatable).")
    pred.add_argument("--input", default=None, help="A file of texts, one per line.")
    pred.add_argument("--base-model", default=None, help="The base model's path here, if not the card's.")
    pred.set_defaults(func=_predict)

    serve = sub.add_parser("serve", help="Serve a run's adapter over HTTP behind API keys (docs/serving.md).")
    serve.add_argument("--adapter", required=True, help="The adapter directory (runs/run-<id>/adapter).")
    serve.add_argument("--keys", default=DEFAULT_KEY_FILE, help=f"The API key file (default {DEFAULT_KEY_FILE}).")
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    serve.add_argument("--port", type=int, default=8000, help="Port (default 8000; 0 = any free port).")
    serve.add_argument("--tls-cert", default=None, help="TLS certificate (PEM) to serve HTTPS with.")
    serve.add_argument("--tls-key", default=None, help="The certificate's private key (PEM).")
    serve.add_argument("--max-batch", type=int, default=32, help="Most texts per request (default 32).")
    serve.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="Largest request body (default 65536).")
    serve.add_argument(
        "--rate-limit",
        type=float,
        default=10.0,
        help="Requests/s per key, and per client address without a valid key (default 10).",
    )
    serve.add_argument(
        "--burst", type=int, default=20, help="Requests a key (or address) may send at once (default 20)."
    )
    serve.add_argument(
        "--metrics-port", type=int, default=0, help="Serve Prometheus metrics on 127.0.0.1:<port> (0 = off)."
    )
    serve.add_argument("--access-log", default=None, help="Also append the access log to this file.")
    serve.add_argument("--base-model", default=None, help="The base model's path here, if not the card's.")
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("serve-keys", help="Create, revoke or list the service's API keys.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    for name, func, text in (
        ("create", _keys_create, "Create a key NAME and print it (once); only its SHA-256 is stored."),
        ("revoke", _keys_revoke, "Revoke the key NAME (its record stays)."),
    ):
        cmd = keys_sub.add_parser(name, help=text)
        cmd.add_argument("name", help="The key's name (who uses it), e.g. triage-app.")
        cmd.add_argument("--keys", default=DEFAULT_KEY_FILE, help=f"The key file (default {DEFAULT_KEY_FILE}).")
        cmd.set_defaults(func=func)
    listing = keys_sub.add_parser("list", help="List key names and states (never a key or its hash).")
    listing.add_argument("--keys", default=DEFAULT_KEY_FILE, help=f"The key file (default {DEFAULT_KEY_FILE}).")
    listing.set_defaults(func=_keys_list)
