"""GET and DELETE /v1/responses/{id}: answers the Responses API stored (`store: true`),
each visible only to the API key that made it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol.errors import ErrorKind
from router.asgi import json_response
from router.auth import owner
from router.errors import error_response
from router.responses_store import ResponseStore
from router.schema import Deleted


def routes(store: ResponseStore) -> list[Route]:
    def missing(response_id: str) -> Response:
        return error_response(ErrorKind.NOT_FOUND, f"Response with id '{response_id}' not found.",
                              "response_id")

    async def get(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        turn = store.get(owner(request.scope), response_id)
        if turn is None:
            return missing(response_id)
        return Response(turn.response, media_type="application/json")

    async def delete(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not store.delete(owner(request.scope), response_id):
            return missing(response_id)
        return json_response(Deleted(response_id))

    return [
        Route("/v1/responses/{response_id}", get, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
    ]
