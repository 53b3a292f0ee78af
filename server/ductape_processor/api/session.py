"""SessionService: proto in, SessionManager call, proto out."""

from __future__ import annotations

from typing import Any

from ductape.processor.v1 import session_pb2, session_pb2_grpc

from ductape_processor.api.calls import Context
from ductape_processor.api.values import struct_to_dict, timestamp
from ductape_processor.errors import InvalidArgument
from ductape_processor.runtime.sessions import SessionManager, TokenPair


def _tokens(pair: TokenPair) -> session_pb2.TokenPair:
    return session_pb2.TokenPair(
        token=pair.token,
        refresh_token=pair.refresh_token,
        expire_time=timestamp(pair.expires_at),
        refresh_expire_time=timestamp(pair.refresh_expires_at),
        session_id=pair.session_id,
    )


def _where(request: Any) -> tuple[str, str, str]:
    for field in ("product", "env", "tag"):
        if not getattr(request, field):
            raise InvalidArgument.field(field, "is required")
    return request.product, request.env, request.tag


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Serves SessionService."""

    def __init__(self, sessions: SessionManager) -> None:
        self._sessions = sessions

    async def Start(self, request: session_pb2.StartRequest, context: Context) -> session_pb2.StartResponse:
        product, env, tag = _where(request)
        pair = await self._sessions.start(product, env, tag, struct_to_dict(request.data))
        return session_pb2.StartResponse(tokens=_tokens(pair))

    async def Verify(self, request: session_pb2.VerifyRequest, context: Context) -> session_pb2.VerifyResponse:
        product, env, tag = _where(request)
        if not request.token:
            raise InvalidArgument.field("token", "is required")
        verified = await self._sessions.verify(product, env, tag, request.token)
        response = session_pb2.VerifyResponse(
            session_id=verified.session_id,
            identifier=verified.identifier,
            expire_time=timestamp(verified.expires_at),
        )
        response.data.update(verified.data)
        return response

    async def Refresh(self, request: session_pb2.RefreshRequest, context: Context) -> session_pb2.RefreshResponse:
        product, env, tag = _where(request)
        if not request.refresh_token:
            raise InvalidArgument.field("refresh_token", "is required")
        pair = await self._sessions.refresh(product, env, tag, request.refresh_token)
        return session_pb2.RefreshResponse(tokens=_tokens(pair))

    async def Revoke(self, request: session_pb2.RevokeRequest, context: Context) -> session_pb2.RevokeResponse:
        product, env, tag = _where(request)
        target = request.WhichOneof("target")
        value = getattr(request, target) if target else ""
        if not value:
            raise InvalidArgument.field("target", "give session_id or identifier")
        revoked = await self._sessions.revoke(
            product,
            env,
            tag,
            session_id=value if target == "session_id" else None,
            identifier=value if target == "identifier" else None,
        )
        return session_pb2.RevokeResponse(revoked=revoked)

    async def ListActive(
        self, request: session_pb2.ListActiveRequest, context: Context
    ) -> session_pb2.ListActiveResponse:
        product, env, tag = _where(request)
        records, token = await self._sessions.list_active(
            product, env, tag, request.identifier or None, request.page_size, request.page_token
        )
        return session_pb2.ListActiveResponse(
            sessions=[
                session_pb2.ActiveSession(
                    session_id=r.session_id,
                    identifier=r.identifier,
                    start_time=timestamp(r.started_at),
                    refresh_time=timestamp(r.refreshed_at),
                    expire_time=timestamp(r.expires_at),
                )
                for r in records
            ],
            next_page_token=token,
        )
