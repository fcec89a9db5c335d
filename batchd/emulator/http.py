"""HTTP plumbing shared by every emulated API: JSON in and out, streamed uploads and downloads
(with the bandwidth knob and the truncated-download fault)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from batchd.emulator.faults import truncate_at
from batchd.emulator.ids import new_id
from batchd.emulator.lines import Json
from batchd.emulator.state import ApiError, EmulatorState

CHUNK = 256 * 1024


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """``obj`` as an ``application/json`` response."""
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


async def json_body(request: web.Request) -> Json:
    """The request's JSON object body, or a 400."""
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(400, "We could not parse the JSON body of your request.")
    return data


def chunk_size(rate: float | None) -> int:
    """Bytes per read/write at ``rate`` bytes/s (None: unthrottled)."""
    return CHUNK if not rate else max(4096, min(CHUNK, int(rate / 20)))


async def throttle(sent: int, start: float, rate: float | None) -> None:
    """Sleep until ``sent`` bytes since ``start`` fit ``rate``."""
    if rate:
        delay = sent / rate - (time.monotonic() - start)
        if delay > 0:
            await asyncio.sleep(delay)


async def multipart(
    request: web.Request, state: EmulatorState, field: str, limit: int, prefix: str = "file-"
) -> tuple[Json, int]:
    """Stream multipart ``field`` to ``data_dir/fields["_id"]``; return (text fields, size);
    size is -1 when the field is absent."""
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise ApiError(400, f"Expected a multipart/form-data body: {exc}") from None
    fields: Json = {}
    size = -1
    fields["_id"] = oid = new_id(prefix)
    path = state.data_dir / oid
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == field:
                fields["_filename"] = part.filename or "upload.jsonl"
                size = await stream_to(part, path, limit, state.config.bandwidth_bytes_per_s)
            else:
                fields[part.name or ""] = (await part.read(decode=True)).decode()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return fields, size


async def stream_to(part: BodyPartReader, path: Path, limit: int, rate: float | None) -> int:
    """Write one multipart part to ``path`` (at most ``limit`` bytes); return its size."""
    size, start = 0, time.monotonic()
    with path.open("wb") as fh:
        while chunk := await part.read_chunk(chunk_size(rate)):
            size += len(chunk)
            if size > limit:
                raise ApiError(400, f"File too large: the maximum is {limit} bytes.", part.name)
            fh.write(chunk)
            await throttle(size, start, rate)
    return size


async def send_file(
    request: web.Request,
    state: EmulatorState,
    path: Path,
    size: int,
    content_type: str = "application/octet-stream",
) -> web.StreamResponse:
    """Stream ``path`` as the response, honouring the bandwidth knob and the truncation fault."""
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    resp.content_length = size
    await resp.prepare(request)
    sent, start, rate = 0, time.monotonic(), state.config.bandwidth_bytes_per_s
    cut = truncate_at(request, size)
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size(rate) if cut is None else cut - sent):
            sent += len(chunk)
            await throttle(sent, start, rate)  # before writing: the client sees the pace
            await resp.write(chunk)
    if cut is not None and request.transport is not None:
        request.transport.close()  # fault: Content-Length promised more than was sent
        return resp
    await resp.write_eof()
    return resp
