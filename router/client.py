"""A small client of the daemon's management API (httpx), for the command line.

Answers are decoded into the router's own response types (router.schema); an error answer
becomes a `ClientError` whose `exit_code` is what the command exits with (router.clientargs).
The event feed is read line by line; each event's data is decoded by its kind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx
import msgspec

from router.clientargs import FAILED, REFUSED, UNREACHABLE
from router.schema import Done, LoadAnswer, ModelBody, ModelList, PullAnswer, RemoveAnswer

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


class ClientError(Exception):
    exit_code = FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unreachable(ClientError):
    exit_code = UNREACHABLE


class Refused(ClientError):
    """401 (no key, or a wrong one) or 403 (a user key asking for an admin's route)."""

    exit_code = REFUSED


class _Detail(msgspec.Struct):
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Detail


class FeedLine(msgspec.Struct):
    """One event of GET /models/sse; `data` stays raw until its kind says what it is."""

    event: str
    model: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")  # llama-server leaves it out when there is none

    def decode(self, kind: type[T]) -> T | None:
        try:
            return msgspec.json.decode(self.data, type=kind)
        except msgspec.ValidationError:  # an event of a newer daemon, or another shape of it
            return None


class Daemon:
    """`async with Daemon(url, key) as d:` then its calls."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=url, headers=headers, trust_env=False,
                                       timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))

    async def __aenter__(self) -> Daemon:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    # ---- calls -----------------------------------------------------------------------

    async def models(self) -> list[ModelBody]:
        return (await self._call("GET", "/models", ModelList)).data

    async def load(self, name: str) -> ModelBody:
        """Returns once it is loaded; raises ClientError with the daemon's reason if not."""
        return (await self._call("POST", "/models/load", LoadAnswer, {"model": name, "wait": True},
                                 wait=True)).model

    async def unload(self, name: str) -> None:
        await self._call("POST", "/models/unload", Done, {"model": name}, wait=True)

    async def remove(self, name: str) -> RemoveAnswer:
        return await self._call("DELETE", "/models", RemoveAnswer, params={"model": name})

    async def pull(self, name: str) -> PullAnswer:
        return await self._call("POST", "/models/pull", PullAnswer, {"model": name, "wait": True}, wait=True)

    @asynccontextmanager
    async def feed(self) -> AsyncIterator[AsyncIterator[FeedLine]]:
        """GET /models/sse, entered once its first event (the snapshot) arrived: from then on
        nothing that happens is missed."""
        try:
            async with self._http.stream("GET", "/models/sse", timeout=httpx.Timeout(
                    None, connect=CONNECT_TIMEOUT)) as r:
                if r.status_code != 200:
                    await r.aread()
                    self._raise(r)
                events = self._events(r)
                first = await anext(events, None)
                if first is None:
                    raise ClientError(f"the daemon at {self.url} ended its event feed at once")
                yield events
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # ---- plumbing --------------------------------------------------------------------

    async def _call(self, method: str, path: str, kind: type[T], body: object | None = None, *,
                    params: dict[str, str] | None = None, wait: bool = False) -> T:
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT) if wait else httpx.USE_CLIENT_DEFAULT
        try:
            r = await self._http.request(method, path, json=body, params=params, timeout=timeout)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if r.status_code >= 400:
            self._raise(r)
        try:
            return msgspec.json.decode(r.content, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ClientError(f"{self.url}{path} answered what modelherd would not ({exc}): is this "
                              "a modelherd daemon?") from exc

    def _raise(self, r: httpx.Response) -> None:
        try:
            message = msgspec.json.decode(r.content, type=_ErrorBody).error.message
        except (msgspec.DecodeError, msgspec.ValidationError):
            message = r.text.strip()[:200] or r.reason_phrase
        if r.status_code in (401, 403):
            raise Refused(f"refused ({r.status_code}): {message}" + (
                "; set MODELHERD_API_KEY or --api-key" if r.status_code == 401 else ""))
        raise ClientError(message)

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
            return Unreachable(f"cannot reach modelherd at {self.url}: {exc or type(exc).__name__}")
        return ClientError(f"the connection to {self.url} failed: {exc or type(exc).__name__}")

    @staticmethod
    async def _events(r: httpx.Response) -> AsyncIterator[FeedLine]:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                try:
                    yield msgspec.json.decode(line[6:], type=FeedLine)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
