"""Fixtures of the serve tests: tiny run folders (base and chat) and a live server on each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import CHAT_TEMPLATE, LiveServer, live_server, save_tiny_run


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("base_run"))


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("chat_run"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def base_server(base_run) -> Iterator[LiveServer]:
    with live_server(base_run, max_tokens_limit=64) as server:
        yield server


@pytest.fixture(scope="module")
def chat_server(chat_run) -> Iterator[LiveServer]:
    with live_server(chat_run, max_tokens_limit=64) as server:
        yield server
