"""The dashboard's web server (aiohttp): the page, its static files, JSON, and server-sent events.

| path | what |
|---|---|
| ``/`` | the page (``static/index.html``), which loads ``/static/dashboard.js`` and ``.css`` |
| ``/events?run=R`` | server-sent events: a JSON snapshot (``DashboardState.snapshot`` + ``meta``) whenever the state moved, at most every ``PUSH_EVERY`` seconds; ``run`` picks the run whose detail it carries (default: the newest) |
| ``/api/snapshot?run=R`` | the same snapshot once |
| ``/api/runs`` | every run's summary (status, episodes, last return, verdict) |
| ``/api/runs/{run_id}`` | one run's detail: its series, chains and verdict |

GET only: the server changes nothing, anywhere. It binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Callable

from aiohttp import web

from .feed import Feed

STATIC = Path(__file__).resolve().parent / "static"
PUSH_EVERY = 0.3      # seconds between looks at the state's version
KEEPALIVE = 15.0      # seconds of silence before a comment line keeps proxies and browsers connected


def _json(data) -> web.Response:
    return web.Response(body=json.dumps(data, allow_nan=False).encode(), content_type="application/json")


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _snapshot_bytes(feed: Feed, run_id: str | None) -> bytes:
    # the snapshot is built under the feed's lock: off the event loop
    return await asyncio.get_running_loop().run_in_executor(None, feed.snapshot_json, run_id)


async def _api_snapshot(request: web.Request) -> web.Response:
    body = await _snapshot_bytes(request.app["feed"], request.query.get("run") or None)
    return web.Response(body=body, content_type="application/json")


async def _api_runs(request: web.Request) -> web.Response:
    feed: Feed = request.app["feed"]
    with feed.lock:
        runs = feed.state.runs_list()
    return _json({"runs": runs})


async def _api_run(request: web.Request) -> web.Response:
    feed: Feed = request.app["feed"]
    run_id = request.match_info["run_id"]
    with feed.lock:
        detail = feed.state.run_detail(run_id)
    if detail is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no run {run_id!r} in the topics read so far"}),
                               content_type="application/json")
    return _json(detail)


async def _events(request: web.Request) -> web.StreamResponse:
    feed: Feed = request.app["feed"]
    run_id = request.query.get("run") or None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    sent, quiet = None, 0.0
    try:
        while True:
            version = feed.version
            if version != sent:
                body = await _snapshot_bytes(feed, run_id)
                await resp.write(b"data: " + body + b"\n\n")
                sent, quiet = version, 0.0
            elif quiet >= KEEPALIVE:
                await resp.write(b": keepalive\n\n")
                quiet = 0.0
            await asyncio.sleep(PUSH_EVERY)
            quiet += PUSH_EVERY
    except (ConnectionResetError, ConnectionError):
        pass   # the page was closed or reloaded
    return resp


def make_app(feed: Feed) -> web.Application:
    app = web.Application()
    app["feed"] = feed
    app.router.add_get("/", _index)
    app.router.add_get("/events", _events)
    app.router.add_get("/api/snapshot", _api_snapshot)
    app.router.add_get("/api/runs", _api_runs)
    app.router.add_get("/api/runs/{run_id}", _api_run)
    app.router.add_static("/static/", STATIC)
    return app


async def serve(feed: Feed, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve until cancelled; ``ready(url)`` once listening (``port`` 0: a free port, named in the url)."""
    runner = web.AppRunner(make_app(feed), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        ready(f"http://{host if ':' not in host else f'[{host}]'}:{bound}")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
