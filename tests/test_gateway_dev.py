"""The seed's flow through a real `koala dev --gateway` process, with the chat example
and its `websockets` client; Ctrl-C closes clients with 1001."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from koala.gateway import ClientCloseCode

from ._gateway_client import session
from ._transport_helpers import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _backend_name(anyio_backend: Any) -> str:
    name, options = anyio_backend
    return "uvloop" if options.get("use_uvloop") else str(name)


async def test_chat_through_koala_dev(anyio_backend: Any) -> None:
    port = free_port()
    env = {**os.environ, "KOALA_BACKEND": _backend_name(anyio_backend), "PYTHONUNBUFFERED": "1"}
    env.pop("KOALA_GATEWAY_KEY", None)
    proc = subprocess.Popen(  # noqa: ASYNC220 (a long-lived process read line by line)
        [
            sys.executable,
            "-m",
            "koala.cli",
            "dev",
            "examples/chat.py",
            "--gateway",
            f"127.0.0.1:{port}",
            "--http",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        with anyio.fail_after(20):
            while "gateway on ws://" not in (
                line := await anyio.to_thread.run_sync(proc.stdout.readline)
            ):
                assert line, "koala dev exited before serving the gateway"
        address = ("127.0.0.1", port)
        async with session(address, "ChatUser", "alice", key="koala-dev-key") as alice:
            assert await alice.receive() == "welcome alice: 1 in lobby"
            assert await alice.receive() == "[lobby] *: alice joined"
            bob = await anyio.run_process(
                [
                    sys.executable,
                    "examples/chat_client.py",
                    "bob",
                    "--url",
                    f"ws://127.0.0.1:{port}",
                    "--say",
                    "hi alice",
                    "--linger",
                    "0.5",
                ],
                cwd=ROOT,
            )
            out = bob.stdout.decode()
            assert "welcome bob: 2 in lobby" in out
            assert "[lobby] bob: hi alice" in out
            seen = [await alice.receive() for _ in range(3)]
            assert seen == ["[lobby] *: bob joined", "[lobby] bob: hi alice", "[lobby] *: bob left"]
            proc.send_signal(signal.SIGINT)
            closed = await alice.expect_close(10)
            assert closed.code == ClientCloseCode.GOING_AWAY
        rest = await anyio.to_thread.run_sync(proc.communicate)
        assert proc.returncode == 0, rest[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
