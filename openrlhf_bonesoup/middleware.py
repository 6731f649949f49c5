"""The ASGI middleware vLLM's OpenAI server runs serve's requests through (`--middleware`): the preference in,
"bonesoup" out, and full-weight soups' requests in groups of one preference.

`Preferences` reads a request's preference (serve.Soup.request_preference: its body field "preference",
else its model name "bonesoup:0.3,0.7", else the default; a bad one is an OpenAI-style 400), rewrites the
body for vLLM, and names every response and stream chunk "bonesoup:<mu>" with a "bonesoup" block
(`_patched`: a JSON body whole, server-sent events one by one). Only the routes in ROUTES are open: another
vLLM route could generate without a preference. Full weights: `Turns` runs requests in groups of one
preference, and a switch reloads the weights in place (serve.switch). vLLM builds the middleware by
import path, so it finds the soup in serve.SERVED, which serve.run fills.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.serve import MODEL, SERVED, Soup, switch

log = logging.getLogger(__name__)

GENERATE = ("/v1/completions", "/v1/chat/completions")
ROUTES = (*GENERATE, "/v1/models", "/health", "/ping", "/version", "/metrics", "/load", "/tokenize", "/detokenize")


class Preferences:
    """The ASGI middleware vLLM adds by import path (--middleware): the preference in, "bonesoup" out."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        soup: Soup = SERVED["soup"]
        path = scope["path"]
        if path not in ROUTES:
            routes = ", ".join(ROUTES)
            return await _error(send, 404, f"{path} is not served here; the routes are {routes}", "NotFoundError")
        if path == "/v1/models":
            return await self.app(scope, receive, _patched(send, _model_card(soup)))
        if path not in GENERATE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        raw = await _read(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # vLLM answers a body that is not a JSON object itself
            return await self.app(scope, _replay(raw, receive), send)
        try:
            mu = soup.request_preference(body)
        except BoneSoupError as e:
            return await _error(send, 400, str(e))
        name = soup.name(mu)
        body["model"] = name if soup.lora else MODEL  # LoRA: the adapter's name; full weights: the one model
        raw = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        info = soup.info(mu)

        def add_info(obj: dict) -> None:
            obj["model"] = name
            obj["bonesoup"] = info

        async def call() -> None:
            await self.app(scope, _replay(raw, receive), _patched(send, add_info))

        if soup.lora:
            return await call()
        if "turns" not in SERVED:
            engine = scope["app"].state.engine_client
            SERVED["turns"] = Turns(lambda mu: switch(engine, soup, mu))
        try:
            await SERVED["turns"].run(mu, call)
        except RuntimeError as e:
            await _error(send, 500, str(e), "InternalServerError")


def _model_card(soup: Soup) -> Callable[[dict], None]:
    def patch(models: dict) -> None:
        for card in models.get("data", []):
            if card.get("id") == MODEL:
                card["bonesoup"] = soup.about()

    return patch


async def _read(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def _replay(raw: bytes, receive):
    """receive() for the app: the (rewritten) body once, then the client's own messages (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


def _patched(send, patch: Callable[[dict], None]):
    """send() for the app: a JSON response, or each server-sent event, goes through patch(obj) on its way out."""
    state = {"mode": None, "start": None, "body": b""}

    async def patched(message):
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and ctype.startswith(b"application/json"):
                state.update(mode="json", start=message)
                return
            state["mode"] = "sse" if ctype.startswith(b"text/event-stream") else None
            return await send(message)
        if message["type"] != "http.response.body" or state["mode"] is None:
            return await send(message)
        state["body"] += message.get("body", b"")
        more = message.get("more_body", False)
        if state["mode"] == "json":
            if more:
                return
            obj = json.loads(state["body"])
            patch(obj)
            body = json.dumps(obj, separators=(",", ":")).encode()
            start = state["start"]
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        events, _, state["body"] = state["body"].rpartition(b"\n\n")
        if not more:
            events, state["body"] = events + b"\n\n" + state["body"], b""
        out = b"".join(_patch_event(e, patch) for e in events.split(b"\n\n") if e) if events else b""
        if out or not more:
            await send({**message, "body": out})

    return patched


def _patch_event(event: bytes, patch: Callable[[dict], None]) -> bytes:
    if event.startswith(b"data: {"):
        obj = json.loads(event[6:])
        if "error" not in obj:
            patch(obj)
            event = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
    return event + b"\n\n"


async def _error(send, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
    """An error in vLLM's (OpenAI's) shape, one line."""
    error = {"message": message.splitlines()[0], "type": kind, "param": param, "code": status}
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Turns:
    """Full weights: one preference on the engine at a time. A request at the preference in place runs at
    once unless others wait; otherwise it joins its preference's group, groups run in order of arrival,
    and a group starts when everything before it has finished: one switch per group, not per request."""

    def __init__(self, switch: Callable[[tuple], Awaitable[None]]):
        self.switch = switch
        self.current: tuple | None = None  # the first request switches (the engine starts on backbone 0)
        self.running = 0
        self.waiting: dict[tuple, dict] = {}  # preference -> {"ready": Event, "size": requests, "error"}
        self.switching: asyncio.Task | None = None

    async def run(self, mu: tuple, call: Callable[[], Awaitable[None]]) -> None:
        if mu == self.current and not self.waiting:
            self.running += 1
        else:
            group = self.waiting.setdefault(mu, {"ready": asyncio.Event(), "size": 0, "error": None})
            group["size"] += 1
            self._next()
            try:
                await group["ready"].wait()
            except BaseException:  # the client left while waiting
                if not group["ready"].is_set():
                    group["size"] -= 1
                elif not group["error"]:  # admitted in the same instant: counted as running
                    self.running -= 1
                    self._next()
                raise
            if group["error"]:
                raise RuntimeError(group["error"])
        try:
            await call()
        finally:
            self.running -= 1
            self._next()

    def _next(self) -> None:
        if not self.running and not self.switching and self.waiting:
            self.switching = asyncio.get_running_loop().create_task(self._start_next())

    async def _start_next(self) -> None:
        mu, group = next(iter(self.waiting.items()))
        try:
            if group["size"] and mu != self.current:  # a group whose clients all left costs nothing
                self.current = None  # a failed switch leaves the weights unknown
                await self.switch(mu)
                self.current = mu
        except Exception as e:
            log.exception("switching the weights to preference %s failed", list(mu))
            group["error"] = f"switching the weights to preference {list(mu)} failed: {type(e).__name__}: {e}"
        finally:
            del self.waiting[mu]
            self.running += 0 if group["error"] else group["size"]
            group["ready"].set()
            self.switching = None
            self._next()
