"""Running the app: bind the socket first (a busy port fails before the model loads), then uvicorn until a signal.

On SIGTERM or SIGINT uvicorn stops accepting connections, lets in-flight requests finish for
`shutdown_timeout_s`, cancels what is left, then runs the app's shutdown (the scheduler stops). A second
Ctrl-C exits at once. A graceful stop returns normally, so the command exits 0.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

from tokenmill.errors import UserError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line UserError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise UserError(f"--host {host!r} is not an address this machine can bind ({err.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app: Any, sock: socket.socket, shutdown_timeout_s: float) -> None:
    """Serve `app` on `sock` until SIGTERM/SIGINT, then shut down gracefully."""
    import uvicorn

    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_graceful_shutdown=shutdown_timeout_s, timeout_keep_alive=5
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler turns that into a clean return.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
