"""`Expect: 100-continue`: the server decides on the declared Content-Length (and the
token) before inviting the client to send the body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.test_http import make_runtime, serve

__all__ = ["make_runtime"]  # the fixture, re-exported for pytest


async def _first_line(url: str, path: str, headers: dict[str, str]) -> str:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode())  # the body is NOT sent: we wait for 100 or a refusal
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()


async def test_oversized_body_is_refused_before_100_continue(
        make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime(max_payload_bytes=1000)
    async with serve(rt) as url:
        for path in ("/v1/jobs", "/v1/dlq/default%2F1-0/replay"):
            line = await _first_line(url, path, {
                "Content-Type": "application/json", "Content-Length": str(10**12),
                "Expect": "100-continue"})
            assert line.startswith("HTTP/1.1 413 "), (path, line)
        # within the limit: the client is invited to send the body
        line = await _first_line(url, "/v1/jobs", {
            "Content-Type": "application/json", "Content-Length": "100",
            "Expect": "100-continue"})
        assert line == "HTTP/1.1 100 Continue"


async def test_missing_token_is_refused_before_100_continue(
        make_runtime: Callable[..., Any], tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    rt = await make_runtime(http={"token_file": str(token)})
    async with serve(rt) as url:
        line = await _first_line(url, "/v1/jobs", {
            "Content-Type": "application/json", "Content-Length": "100",
            "Expect": "100-continue"})
        assert line.startswith("HTTP/1.1 401 "), line
        line = await _first_line(url, "/v1/jobs", {
            "Content-Type": "application/json", "Content-Length": "100",
            "Expect": "100-continue", "Authorization": "Bearer s3cret"})
        assert line == "HTTP/1.1 100 Continue"
