"""`python -m api.webhooks list [--limit N]`: the last webhook deliveries with their attempts, one
JSON object a line, newest first. Read from Redis with the service's settings, for an operator on
a host that has them (no admin key needed; GET /v1/webhooks/deliveries is the HTTP way)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tasks.redis import async_client
from tasks.settings import get_settings
from tasks.webhooks import RECENT_DELIVERIES, WebhookStore


async def _list(limit: int) -> None:
    settings = get_settings()
    client = async_client(settings, name="llmq-webhooks-cli")
    try:
        store = WebhookStore(client, record_ttl_seconds=settings.job_ttl_seconds)
        for delivery in await store.recent(limit):
            sys.stdout.write(delivery.model_dump_json() + "\n")  # the command's output, not a log
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m api.webhooks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the last deliveries, newest first")
    listing.add_argument(
        "--limit", type=int, default=20, choices=range(1, RECENT_DELIVERIES + 1), metavar="N"
    )
    args = parser.parse_args()
    asyncio.run(_list(args.limit))


if __name__ == "__main__":
    main()
