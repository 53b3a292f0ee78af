"""ActionService: proto in, ActionExecutor call, proto out."""

from __future__ import annotations

import json
from typing import Literal

from ductape.processor.v1 import action_pb2, action_pb2_grpc

from ductape_processor.api.calls import Context, deadline
from ductape_processor.api.values import (
    MAX_JSON_DEPTH,
    json_depth,
    pinned_version,
    python_to_value,
    required,
    session_pair,
    struct_to_dict,
)
from ductape_processor.runtime.actions.call import ActionCall
from ductape_processor.runtime.actions.executor import ActionExecutor

_PARTS: tuple[Literal["query"], Literal["params"], Literal["body"], Literal["headers"]] = (
    "query",
    "params",
    "body",
    "headers",
)


class ActionServicer(action_pb2_grpc.ActionServiceServicer):
    """Serves ActionService."""

    def __init__(self, executor: ActionExecutor) -> None:
        self._executor = executor

    async def Run(self, request: action_pb2.RunRequest, context: Context) -> action_pb2.RunResponse:
        session = session_pair(request)
        version = pinned_version(request.version)
        given = request.input
        call = ActionCall(
            product=required(request.product, "product", "the product's tag"),
            env=required(request.env, "env", "the environment's slug or name"),
            app=required(request.app, "app", "the app's tag"),
            event=required(request.event, "event", "the action's tag"),
            input={part: struct_to_dict(getattr(given, part)) for part in _PARTS if given.HasField(part)},
            session=session,
            cache=request.cache,
            retries=request.retries if request.HasField("retries") else None,
            version=version,
            idempotency_key=request.idempotency_key,
        )
        result = await self._executor.run(call, deadline(context))
        response = action_pb2.RunResponse(
            status_code=result.status,
            content_type=result.content_type,
            process_id=result.process_id,
            attempts=result.attempts,
            cached=result.cached,
            version=result.version,
        )
        headers = response.headers
        for name, value in result.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        response.raw = result.body
        if "json" in result.content_type and result.body:
            try:
                data = json.loads(result.body)
            except (ValueError, RecursionError):
                return response  # not JSON after all (or nested past Python's recursion limit): the bytes
            if json_depth(data) <= MAX_JSON_DEPTH:
                try:
                    python_to_value(data, response.json)
                except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"), no protobuf string can
                    response.raw = result.body  # hold it: the bytes, as for a body that is not JSON
        return response
