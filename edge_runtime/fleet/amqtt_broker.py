"""``python -m edge_runtime.fleet.amqtt_broker PORT``: the embedded broker where Mosquitto is not
installed (the demo's fallback); anonymous, loopback only, MQTT 3.1.1."""

from __future__ import annotations

import asyncio
import sys


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


def main() -> None:
    asyncio.run(_serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
