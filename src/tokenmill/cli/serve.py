"""`tokenmill serve RUN|CHECKPOINT`: an OpenAI-compatible HTTP server (completions, chat, streaming, playground).

Binds 127.0.0.1 unless told otherwise; with an API key (--api-key or TOKENMILL_API_KEY) every endpoint but
/health and the playground page needs `Authorization: Bearer KEY`. Needs the `serve` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tokenmill.errors import UserError

API_KEY_ENV = "TOKENMILL_API_KEY"
SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "jinja2")
INT_OPTIONS = ("port", "max_batch", "max_queue", "max_tokens_limit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Numbers stay strings here and are checked in run(), so a bad value is one `error:` line, not argparse usage.
    parser.add_argument("path", metavar="RUN|CHECKPOINT", help="run folder (its latest valid checkpoint) or checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", default="8000", metavar="N", help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)",
    )
    parser.add_argument("--max-batch", default="8", metavar="N", help="sequences generated together (default 8)")
    parser.add_argument(
        "--max-queue",
        default="64",
        metavar="N",
        help="requests waiting for a slot before new ones get 429 (default 64)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        default="1024",
        metavar="N",
        help="largest max_tokens a request may ask for (default 1024)",
    )
    parser.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="model id clients send and /v1/models lists (default: the run folder's name)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    missing = [name for name in SERVE_EXTRA if not _importable(name)]
    if missing:
        raise UserError(
            f"tokenmill serve needs the serve extra ({', '.join(missing)} missing): pip install 'tokenmill[serve]'"
        )
    from tokenmill.serve.config import LOOPBACK_HOSTS, ServeSettings

    numbers = {name: _parse_int(name, getattr(args, name)) for name in INT_OPTIONS}
    if not 0 <= numbers["port"] <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {numbers['port']}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if args.host not in LOOPBACK_HOSTS and not api_key:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this machine can use "
            f"the model; set --api-key or {API_KEY_ENV}",
            file=sys.stderr,
        )
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder (e.g. runs/demo) or a checkpoint folder")
    settings = ServeSettings(
        model_name=args.model_name if args.model_name is not None else _default_name(path),
        api_key=api_key,
        max_batch=numbers["max_batch"],
        max_queue=numbers["max_queue"],
        max_tokens_limit=numbers["max_tokens_limit"],
    )
    settings.validate()

    from tokenmill.serve.server import bind_socket, run_server

    sock = bind_socket(args.host, numbers["port"])  # fail on a busy port before spending time loading the model
    try:
        from tokenmill.serve.app import create_app
        from tokenmill.serve.loading import load_served_model

        _configure_logging()
        served = load_served_model(path, device=args.device, max_batch=settings.max_batch)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("tokenmill.serve").info(
            "listening on http://%s:%d (playground: http://%s:%d/)", shown, port, shown, port
        )
        run_server(create_app(served, settings), sock, settings.shutdown_timeout_s)
    finally:
        sock.close()
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')} must be an integer, got {value!r}") from None


def _default_name(path: Path) -> str:
    """The run folder's name: `runs/demo` and `runs/demo/checkpoints/step_000300` both serve as "demo"."""
    resolved = path.resolve()
    if resolved.parent.name == "checkpoints":
        return resolved.parent.parent.name
    return resolved.name if resolved.name != "checkpoints" else resolved.parent.name


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
