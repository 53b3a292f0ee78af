"""A stand-in for the example product's mailer API, so `make run` works with no external service.

Serves `POST /v2/templates/{template}/send` on 127.0.0.1:8025 (or PORT) and answers like a mail API would:
202 with a message id; and `POST /hooks/orders`, a partner's endpoint for the example's `orders` webhook (204).
It checks the bearer key the processor renders from `$Secret{MAILER_KEY}`.

    python examples/mailer_stub.py          # then call the `mailer:send_welcome` action through the processor
"""

from __future__ import annotations

import itertools
import os

from aiohttp import web

EXPECTED_KEY = os.environ.get("MAILER_KEY", "dev-only-mailer-key")
_ids = itertools.count(1)


async def send(request: web.Request) -> web.Response:
    """Accept a templated e-mail."""
    if request.headers.get("Authorization") != f"Bearer {EXPECTED_KEY}":
        return web.json_response({"error": "unauthorized"}, status=401)
    payload = await request.json()
    if not isinstance(payload, dict) or "to" not in payload:
        return web.json_response({"error": "`to` is required"}, status=400)
    return web.json_response(
        {"id": f"msg-{next(_ids)}", "template": request.match_info["template"], "to": payload["to"], "queued": True},
        status=202,
    )


async def order_hook(request: web.Request) -> web.Response:
    """A partner's webhook endpoint for the `orders` webhook: takes a signed delivery (204)."""
    if not all(request.headers.get(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")):
        return web.json_response({"error": "not a signed webhook"}, status=400)
    await request.read()
    return web.Response(status=204)


def make_app() -> web.Application:
    """The stub's routes."""
    app = web.Application()
    app.router.add_post("/v2/templates/{template}/send", send)
    app.router.add_post("/hooks/orders", order_hook)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8025")), print=None)
