"""A chat client for ``examples/chat.py``: signs a first packet, then chats.

    python examples/chat_client.py alice                  # interactive: type lines
    python examples/chat_client.py bob --say hi --say bye  # say lines, print, exit

The key must be the gateway's (``KOALA_GATEWAY_KEY``; ``koala dev`` without it uses
the development key ``koala-dev-key``). Uses the ``websockets`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import sys
import time

from websockets.asyncio.client import connect


def first_packet(name: str, key: str) -> str:
    """The seed's checksum: fields sorted by key (without check_sum), written as
    key1value1key2value2..., the private key appended, SHA-256, hex."""
    fields: dict[str, str | int] = {
        "open_id": name,
        "server_id": "1",
        "timestamp": int(time.time()),
        "actor_type": "ChatUser",
        "actor_id": name,
        "nonce": secrets.token_hex(8),  # a fresh packet per connection: replays are refused
    }
    text = "".join(f"{k}{fields[k]}" for k in sorted(fields))
    fields["check_sum"] = hashlib.sha256((text + key).encode()).hexdigest()
    return json.dumps(fields)


async def chat(url: str, name: str, key: str, lines: list[str], linger: float) -> None:
    async with connect(url) as ws:
        await ws.send(first_packet(name, key))
        print(await ws.recv(), flush=True)  # the welcome
        if lines:
            for line in lines:
                await ws.send(line)
            try:
                async with asyncio.timeout(linger):
                    async for message in ws:
                        print(message, flush=True)
            except TimeoutError:
                pass
            return
        loop = asyncio.get_running_loop()

        async def printer() -> None:
            async for message in ws:
                print(message, flush=True)

        task = asyncio.create_task(printer())
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            await ws.send(line.rstrip("\n"))
        task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--url", default="ws://127.0.0.1:8001")
    parser.add_argument("--key", default=os.environ.get("KOALA_GATEWAY_KEY", "koala-dev-key"))
    parser.add_argument("--say", action="append", default=[], help="a line to say (repeatable)")
    parser.add_argument("--linger", type=float, default=1.0, help="seconds to print after")
    args = parser.parse_args()
    asyncio.run(chat(args.url, args.name, args.key, args.say, args.linger))


if __name__ == "__main__":
    main()
