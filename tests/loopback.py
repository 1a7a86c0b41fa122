"""A real HTTP server on 127.0.0.1 (pytest-httpserver) that sends every request to the
stand-in's ``_handle``: the shared part of the API stand-ins (tests/cli/kfp_standin.py,
tests/trainjob/k8s_standin.py), which differ only in what they answer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_httpserver import HTTPServer
from pytest_httpserver.httpserver import METHOD_ALL


@dataclass
class Recorded:
    """One request a stand-in received."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None = None


class LoopbackServer:
    """Mixin: ``self._server`` (an ``HTTPServer``) routed to ``self._handle``."""

    _server: HTTPServer

    @property
    def url(self) -> str:
        return self._server.url_for("").rstrip("/")

    def start(self):
        self._server.expect_request(re.compile(".*"), method=METHOD_ALL) \
            .respond_with_handler(self._handle)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.clear()
        if self._server.is_running():
            self._server.stop()


Server = TypeVar("Server", bound=LoopbackServer)


@contextmanager
def serving(standin: Server) -> Iterator[Server]:
    """``standin`` started for the block, stopped after it."""
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()
