"""Run the service on uvicorn: on a socket bound here (so that port 0 picks a free port we can report), with
TLS when given a certificate and its key, uvicorn's own access log off (ours logs every request)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

logger = logging.getLogger("privatune")

INSECURE_BIND_WARNING = (
    "SERVING WITHOUT TLS ON A NON-LOOPBACK ADDRESS (%s): API keys and texts cross the network in the clear. "
    "Give --tls-cert and --tls-key, or bind 127.0.0.1 behind a TLS proxy."
)
MAX_CONNECTIONS = 64  # uvicorn answers 503 beyond this many concurrent connections and tasks


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be in 0..65535, got {port!r}")
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from e
    return sock


def make_server(app: Any, *, tls_cert: Path | None = None, tls_key: Path | None = None) -> uvicorn.Server:
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    for what, path in (("TLS certificate", tls_cert), ("TLS key", tls_key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{what} {path} does not exist")
    config = uvicorn.Config(
        app,
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=5,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )
    try:
        config.load()  # here, so that a bad certificate is an error before anything listens
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"TLS certificate {tls_cert} and key {tls_key} cannot be loaded: {e}") from e
    return uvicorn.Server(config)


def base_url(sock: socket.socket, *, tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def serve_forever(app: Any, *, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM; prints the URL once the socket listens."""
    server = make_server(app, tls_cert=tls_cert, tls_key=tls_key)
    if tls_cert is None and not is_loopback(host):
        logger.warning(INSECURE_BIND_WARNING, host)
    sock = bind(host, port)
    logger.info("serving on %s (OpenAPI docs at /docs; Ctrl+C stops)", base_url(sock, tls=tls_cert is not None))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def running(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    start_timeout_s: float = 30.0,
) -> Iterator[str]:
    """The service in a background thread for the ``with`` block (tests, the load benchmark); yields its URL."""
    server = make_server(app, tls_cert=tls_cert, tls_key=tls_key)
    sock = bind(host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="privatune-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start within {start_timeout_s:.0f}s")
            time.sleep(0.02)
        yield base_url(sock, tls=tls_cert is not None)
    finally:
        server.should_exit = True
        thread.join(timeout=start_timeout_s)
        sock.close()
