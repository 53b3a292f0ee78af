"""A real local HTTP upstream for tests: routes by 'METHOD /path', records every request it receives."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse] | web.StreamResponse]


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A real HTTP server; `routes` maps 'METHOD /path' to a handler, `seen` lists every request received."""

    server: TestServer | None = None
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def on(self, route: str, handler: Handler) -> None:
        self.routes[route] = handler

    def hits(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


async def start_upstream() -> Upstream:
    """Start an upstream on 127.0.0.1 and a free port; close it with `await upstream.server.close()`."""
    state = Upstream()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key, []).append(value)
        state.seen.append(
            Seen(request.method, request.path, request.raw_path, query, dict(request.headers), await request.read())
        )
        handler = state.routes.get(f"{request.method} {request.path}")
        if handler is None:
            return web.json_response({"echo": True})
        answer = handler(request)
        return await answer if inspect.isawaitable(answer) else answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    state.server = TestServer(app, host="127.0.0.1", port=0, shutdown_timeout=2.0)
    await state.server.start_server()
    return state


def json_answer(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def text_answer(text: str, content_type: str) -> web.Response:
    return web.Response(text=text, content_type=content_type)


def redirect_answer(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})
