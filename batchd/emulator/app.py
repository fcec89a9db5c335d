"""aiohttp routes of the OpenAI Batch API emulator (``/v1/...`` plus ``/_emulator/stats``).

Optional fault injection: :mod:`batchd.emulator.faults`; webhooks: :mod:`batchd.emulator.webhooks`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler, Middleware

from batchd.emulator.faults import fault_middleware, truncate_at
from batchd.emulator.ids import new_id
from batchd.emulator.lines import Json
from batchd.emulator.state import PURPOSES, ApiError, EmulatorConfig, EmulatorState
from batchd.emulator.webhooks import webhook_ctx

STATE_KEY = web.AppKey("emulator_state", EmulatorState)
CHUNK = 256 * 1024


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _check_auth(request: web.Request, api_key: str | None) -> None:
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not token:
        msg = "You didn't provide an API key. Provide it in an Authorization header (Bearer auth)."
        raise ApiError(401, msg)
    if api_key is not None and token != api_key:
        raise ApiError(401, f"Incorrect API key provided: {token[:8]}...", None, "invalid_api_key")


def _chunk_size(rate: float | None) -> int:
    return CHUNK if not rate else max(4096, min(CHUNK, int(rate / 20)))


async def _throttle(sent: int, start: float, rate: float | None) -> None:
    if rate:
        delay = sent / rate - (time.monotonic() - start)
        if delay > 0:
            await asyncio.sleep(delay)


async def _json_body(request: web.Request) -> Json:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(400, "We could not parse the JSON body of your request.")
    return data


def _simple(fn: Callable[[web.Request], Json]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return _json(fn(request))

    return handler


class _Routes:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    async def _multipart(self, request: web.Request, field: str, limit: int) -> tuple[Json, int]:
        """Stream ``field`` to ``data_dir/fields["_id"]``; return (text fields, size)."""
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError) as exc:
            raise ApiError(400, f"Expected a multipart/form-data body: {exc}") from None
        fields: Json = {}
        size = -1
        fields["_id"] = oid = new_id("file-" if field == "file" else "part_")
        path = self.state.data_dir / oid
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == field:
                    fields["_filename"] = part.filename or "upload.jsonl"
                    size = await self._stream_to(part, path, limit)
                else:
                    fields[part.name or ""] = (await part.read(decode=True)).decode()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if size < 0:
            msg = f"Missing required parameter: '{field}'."
            raise ApiError(400, msg, field, "missing_required_parameter")
        return fields, size

    async def _stream_to(self, part: BodyPartReader, path: Path, limit: int) -> int:
        size, start, rate = 0, time.monotonic(), self.state.config.bandwidth_bytes_per_s
        with path.open("wb") as fh:
            while chunk := await part.read_chunk(_chunk_size(rate)):
                size += len(chunk)
                if size > limit:
                    raise ApiError(400, f"File too large: the maximum is {limit} bytes.", part.name)
                fh.write(chunk)
                await _throttle(size, start, rate)
        return size

    async def create_file(self, request: web.Request) -> web.Response:
        fields, size = await self._multipart(request, "file", self.state.config.max_file_bytes)
        purpose = fields.get("purpose")
        if purpose not in PURPOSES:
            (self.state.data_dir / fields["_id"]).unlink(missing_ok=True)
            msg = f"Invalid value for 'purpose': {purpose!r}."
            raise ApiError(400, msg, "purpose", "invalid_value")
        return _json(
            self.state.add_file(fields["_id"], fields["_filename"], purpose, size, None).to_dict()
        )

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = self.state.get_file(request.match_info["id"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = f.bytes
        await resp.prepare(request)
        sent, start, rate = 0, time.monotonic(), self.state.config.bandwidth_bytes_per_s
        cut = truncate_at(request, f.bytes)
        with f.path.open("rb") as fh:
            while chunk := fh.read(_chunk_size(rate) if cut is None else cut - sent):
                sent += len(chunk)
                await _throttle(sent, start, rate)  # before writing: the client sees the pace
                await resp.write(chunk)
        if cut is not None and request.transport is not None:
            request.transport.close()  # fault: Content-Length promised more than was sent
            return resp
        await resp.write_eof()
        return resp

    async def create_upload(self, request: web.Request) -> web.Response:
        return _json(self.state.create_upload(await _json_body(request)).to_dict())

    async def add_part(self, request: web.Request) -> web.Response:
        upload = self.state.pending_upload(request.match_info["id"])
        fields, size = await self._multipart(request, "data", self.state.config.max_part_bytes)
        return _json(self.state.add_part(upload, fields["_id"], size))

    async def complete_upload(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        return _json((await self.state.complete_upload(request.match_info["id"], body)).to_dict())

    async def create_batch(self, request: web.Request) -> web.Response:
        b = self.state.create_batch(await _json_body(request))
        return _json(self.state.batch_dict(b))

    def list_batches(self, request: web.Request) -> Json:
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise ApiError(400, "Invalid 'limit': expected an integer in 1..100.", "limit")
        return self.state.list_batches(int(raw), request.query.get("after"))


def create_app(state: EmulatorState) -> web.Application:
    """Build the emulator application; ``app[STATE_KEY]`` is ``state``."""

    @web.middleware
    async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        resource = request.match_info.route.resource
        if resource is not None:
            state.calls[f"{request.method} {resource.canonical}"] += 1
        try:
            _check_auth(request, state.config.api_key)
            return await handler(request)
        except ApiError as exc:
            return _json(exc.body(), exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            url = f"Invalid URL ({request.method} {request.path})"
            err = ApiError(exc.status, url if exc.status in (404, 405) else exc.reason)
            return _json(err.body(), exc.status)

    def oid(request: web.Request) -> str:
        return request.match_info["id"]

    st, r = state, _Routes(state)
    simple: list[tuple[str, str, Callable[[web.Request], Json]]] = [
        (
            "GET",
            "/v1/files",
            lambda q: st.list_files(
                q.query.get("purpose"),
                min(10_000, int(q.query.get("limit", "10000"))),
                q.query.get("after"),
            ),
        ),
        ("GET", "/v1/files/{id}", lambda q: st.get_file(oid(q)).to_dict()),
        ("DELETE", "/v1/files/{id}", lambda q: st.delete_file(oid(q))),
        ("POST", "/v1/uploads/{id}/cancel", lambda q: st.cancel_upload(oid(q)).to_dict()),
        ("GET", "/v1/batches", r.list_batches),
        ("GET", "/v1/batches/{id}", lambda q: st.batch_dict(st.get_batch(oid(q)))),
        ("POST", "/v1/batches/{id}/cancel", lambda q: st.batch_dict(st.cancel_batch(oid(q)))),
        ("GET", "/_emulator/stats", lambda q: st.stats()),
    ]
    middlewares: list[Middleware] = [api_middleware]  # outermost: faults only after auth
    if state.config.faults.enabled():
        middlewares.append(fault_middleware(state.config.faults, state))
    app = web.Application(middlewares=middlewares)
    app[STATE_KEY] = state
    if state.config.webhook_url:
        app.cleanup_ctx.append(webhook_ctx(state))
    for method, path, fn in simple:
        app.router.add_route(method, path, _simple(fn))
    app.router.add_post("/v1/files", r.create_file)
    app.router.add_get("/v1/files/{id}/content", r.file_content)
    app.router.add_post("/v1/uploads", r.create_upload)
    app.router.add_post("/v1/uploads/{id}/parts", r.add_part)
    app.router.add_post("/v1/uploads/{id}/complete", r.complete_upload)
    app.router.add_post("/v1/batches", r.create_batch)
    return app


async def serve(host: str, port: int, config: EmulatorConfig) -> None:
    """Serve the emulator on ``host:port`` until cancelled."""
    state = EmulatorState(config)
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        state.close()
