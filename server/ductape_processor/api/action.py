"""ActionService: proto in, ActionExecutor call, proto out."""

from __future__ import annotations

from ductape.processor.v1 import action_pb2, action_pb2_grpc

from ductape_processor.api.calls import Context, call_options
from ductape_processor.api.values import json_to_value, required, struct_to_dict
from ductape_processor.runtime.actions.call import ActionCall
from ductape_processor.runtime.actions.executor import ActionExecutor
from ductape_processor.runtime.policies import Deadline


class ActionServicer(action_pb2_grpc.ActionServiceServicer):
    """Serves ActionService."""

    def __init__(self, executor: ActionExecutor) -> None:
        self._executor = executor

    async def Run(self, request: action_pb2.RunRequest, context: Context) -> action_pb2.RunResponse:
        options = call_options(request)
        # Each name read once (a protobuf string field is a new str on every read) and checked together; the first
        # one missing is the error, in the order product, env, app, event.
        product, env, app, event = request.product, request.env, request.app, request.event
        if not (product and env and app and event):
            required(product, "product", "the product's tag")
            required(env, "env", "the environment's slug or name")
            required(app, "app", "the app's tag")
            required(event, "event", "the action's tag")
        # The parts present (a part set to an empty object included), read in one call rather than four HasField.
        given = {}
        for field, part in request.input.ListFields():
            given[field.name] = struct_to_dict(part)
        call = ActionCall(product, env, app, event, given, request.cache, **options)
        result = await self._executor.run(call, Deadline(context.time_remaining()))  # `deadline()`, written out
        response = action_pb2.RunResponse(
            status_code=result.status,
            content_type=result.content_type,
            process_id=result.process_id,
            attempts=result.attempts,
            cached=result.cached,
            version=result.version,
            raw=result.body,
        )
        # Set entry by entry rather than given to the constructor as a dict, which protobuf copies in through the
        # Python-level MutableMapping.update (a third of the response's cost).
        headers = response.headers
        for name, value in result.headers:  # repeated fields joined into one value, as HTTP allows
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "json" in result.content_type and result.body and not json_to_value(result.body, response.json):
            response.raw = result.body  # not JSON after all, too deep, or a string protobuf cannot hold: the bytes
        return response
