"""The webhook HTTP listener: provider webhooks POSTed to `/webhooks/<product>/<env><path>` (a webhook's receive
path in that environment).

Started only once a product declares a `receive` (checked at start and on every registry poll), on
`PROCESSOR_WEBHOOK_HTTP_ADDRESS` (loopback by default). Like a servicer it only converts: it finds the receive
target, reads at most its `max_body_bytes` (larger: 413), and answers what the receiver says: 200 with the received
webhook's id once it is verified and stored (dispatch goes on after the answer), 401 for a signature that does not
verify, is too old or replays a webhook id, 404 for an unknown path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ductape_processor.errors import NotFound, ProcessorError
from ductape_processor.reasons import Reason
from ductape_processor.runtime.webhooks.receiver import WebhookReceiver
from ductape_processor.runtime.webhooks.signing import SignatureRefused

if TYPE_CHECKING:  # aiohttp's web server (about 12 MB) is imported when the listener starts, not with the server
    from aiohttp import web

log = logging.getLogger(__name__)

PATH_PREFIX = "/webhooks"
_CHUNK = 64 * 1024


def _answer(status: int, **fields: str) -> web.Response:
    from aiohttp import web

    return web.json_response(fields, status=status)


class WebhookHttpListener:
    """One aiohttp server bound to `address` (host:port; port 0 picks one), started by `ensure`."""

    def __init__(self, receiver: WebhookReceiver, address: str) -> None:
        self._receiver = receiver
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self.port = 0
        """The bound port, once started."""
        self._runner: web.AppRunner | None = None
        self._started = False
        self._stopped = False

    async def ensure(self) -> None:
        """Start serving when a product declares a receive path (and the listener is not serving yet)."""
        if self._started or self._stopped or not await self._receiver.declared():
            return
        from aiohttp import web

        app = web.Application()
        app.router.add_route("POST", PATH_PREFIX + "/{product}/{env}/{path:.+}", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self._started = True
        self.port = int(self._runner.addresses[0][1])
        log.info("webhook HTTP listener serving", extra={"address": f"{self._host}:{self.port}"})

    async def stop(self) -> None:
        """Stop serving; requests in flight are cut."""
        self._stopped = True
        runner, self._runner = self._runner, None
        if runner is not None and self._started:
            await runner.cleanup()

    async def _post(self, request: web.Request) -> web.Response:
        info = request.match_info
        try:
            target = await self._receiver.target(info["product"], info["env"], "/" + info["path"])
        except ProcessorError as exc:
            status = 404 if isinstance(exc, NotFound) else 503
            return _answer(status, reason=str(exc.reason) if status == 404 else str(Reason.UNAVAILABLE))
        limit = target.receive.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _answer(413, error=f"the body is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limit:
                return _answer(413, error=f"the body is larger than {limit} bytes")
            chunks.append(chunk)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            record = await self._receiver.accept(target, headers, b"".join(chunks))
        except SignatureRefused as exc:
            log.info(
                "received webhook refused",
                extra={"product": target.product, "env": target.env, "webhook": target.webhook.tag, "why": str(exc)},
            )
            return _answer(401, error="the webhook's signature does not verify")
        except ProcessorError as exc:
            log.warning("received webhook not stored: %s", exc.message)
            return _answer(503, reason=str(exc.reason))
        return _answer(200, id=record.received_id)
