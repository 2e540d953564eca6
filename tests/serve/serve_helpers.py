"""A tiny served model and a real uvicorn server on a loopback port, shared by the tests of tokenmill serve.

The model is the `tiny` preset shrunk to 2 layers of width 64, random weights, on a character tokenizer of
printable ASCII plus <|eos|> <|bos|> <|pad|> (saved as the checkpoint's tokenizer.json), so generated text is
readable and stop strings can be picked from it. The server runs in a daemon thread on a socket bound to
127.0.0.1:0 before uvicorn starts (no port race); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest
import torch

import tokenmill
from tokenmill.checkpoint.manager import Checkpointer
from tokenmill.config import load_config
from tokenmill.data.tokenizer import SPECIAL_TOKENS, Tokenizer

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is in the serve extra")

from tokenmill.serve.app import create_app  # noqa: E402 (after the skips above)
from tokenmill.serve.config import ServeSettings  # noqa: E402 (after the skips above)
from tokenmill.serve.loading import ServedModel, load_served_model  # noqa: E402 (after the skips above)

MODEL_NAME = "tiny-test"
CONTEXT = 96
CHARS = [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant: {% endif %}"
)
START_TIMEOUT_S = 20.0


def char_tokenizer() -> Tokenizer:
    """One token per printable ASCII character, then the three special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    return Tokenizer.from_backend(backend, "chars")


def save_tiny_run(run_dir: Path, chat_template: str | None = None) -> Path:
    """A run folder holding one checkpoint of the tiny character model (and a chat template if given)."""
    tokenizer = char_tokenizer()
    overrides = [
        f"model.vocab_size={tokenizer.vocab_size}",
        "model.n_layers=2",
        "model.d_model=64",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        f"model.max_seq_len={CONTEXT}",
        "model.dropout=0.0",
    ]
    cfg = load_config(["tiny"], overrides=overrides)
    torch.manual_seed(0)
    model = tokenmill.create_model(cfg)
    with torch.no_grad():
        model.tok_emb.weight[tokenizer.eos_id].zero_()  # the tied head gives <|eos|> logit 0: rarely sampled
        model.tok_emb.weight.mul_(2.0)  # sharper logits, so sampled text is varied but not uniform noise
    if chat_template is None:  # the tokenizer travels inside the checkpoint (listed in its manifest)
        Checkpointer(
            run_dir, cfg.checkpoint, {"model": model}, run_config=cfg, tokenizer_json=tokenizer.backend.to_str()
        ).save(1)
    else:  # a tokenizer folder beside the run, as a fine-tuning run records it, with the template in its config
        tokenizer_dir = run_dir / "tokenizer"
        tokenizer.save(tokenizer_dir)
        (tokenizer_dir / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": chat_template, "eos_token": "<|eos|>"})
        )
        cfg = load_config(["tiny"], overrides=[*overrides, f"data.tokenizer={tokenizer_dir / 'tokenizer.json'}"])
        Checkpointer(run_dir, cfg.checkpoint, {"model": model}, run_config=cfg).save(1)
    return run_dir


class LiveServer:
    """uvicorn serving an app in a background thread; `url` is its http://127.0.0.1:PORT."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, api_key: str = "test", strict: bool = True, timeout: float = 60.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=api_key,
            max_retries=0,
            timeout=timeout,
            _strict_response_validation=strict,
        )


@contextlib.contextmanager
def live_server(
    run_dir: Path, prepare: Callable[[ServedModel], None] | None = None, **settings
) -> Iterator[LiveServer]:
    """A server for `run_dir` with ServeSettings `settings`; `prepare` may instrument the model before it starts."""
    served = load_served_model(run_dir, device="cpu", max_batch=settings.get("max_batch", 8))
    if prepare is not None:
        prepare(served)
    app = create_app(served, ServeSettings(model_name=MODEL_NAME, **settings))
    with LiveServer(app) as server:
        yield server
