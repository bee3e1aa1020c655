"""`python -m nodeagent.simfleet --count N`: N simulated agents in one process.

For fleet-scale tests and benchmarks on a machine without GPUs: one agent
process costs about 44 MB, so a thousand of them would not fit in memory,
while agents sharing one event loop cost little each. Every agent is a full
`AgentServer` (its own port, cache directory, metrics and registration) with
the sim engine as its default; ports are consecutive from --base-port and ids
are --id-prefix plus a number. Other flags go to every agent (see
`python -m nodeagent --help`), e.g. --token, --control-plane-url, --sim-*.
With --token-dir, each agent reads its own token from the file there named
after its id (the credential its Agent row was enrolled with), instead of one
--token for all. The engines' KV events are off here unless --kv-events true is given:
each engine's feed is two ZMQ sockets, and one process's ZMQ context holds at most 1,023.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from nodeagent.config import AgentConfig, parse_config
from nodeagent.server import AgentServer


def fleet_configs(argv: Sequence[str] | None = None) -> list[AgentConfig]:
    # No abbreviations: `--token`, meant for every agent, must not be taken as `--token-dir`.
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent.simfleet", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--count", type=int, default=10, help="how many agents (default 10)")
    parser.add_argument("--base-port", type=int, default=9100, help="port of the first agent")
    parser.add_argument("--id-prefix", default="sim-", help="agent ids are this plus a number")
    parser.add_argument(
        "--cache-root", type=Path, default=Path.home() / ".cache" / "llmfleet-sim",
        help="each agent's cache is a directory below this",
    )  # fmt: skip
    parser.add_argument(
        "--token-dir", type=Path,
        help="each agent's token is in the file named after its id here (its own credential)",
    )  # fmt: skip
    own, shared = parser.parse_known_args(argv)
    if own.count < 1:
        parser.error("--count must be at least 1")
    configs = []
    for number in range(own.count):
        agent_id = f"{own.id_prefix}{number}"
        placement = ["--agent-id", agent_id, "--port", str(own.base_port + number)]
        cache = ["--cache-dir", str(own.cache_root / agent_id)]
        token = [] if own.token_dir is None else ["--token-file", str(own.token_dir / agent_id)]
        configs.append(parse_config(
            ["--engine", "sim", "--kv-events", "false", *shared, *placement, *cache, *token]
        ))  # fmt: skip
    return configs


async def run(configs: Sequence[AgentConfig]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for config in configs:
            runners.append(await AgentServer(config).start())
        first, last = configs[0], configs[-1]
        logging.getLogger(__name__).info(
            "%d sim agents up: %s..%s on ports %d..%d", len(configs), first.agent_id, last.agent_id,
            first.port, last.port,
        )  # fmt: skip
        await stop.wait()
    finally:
        await asyncio.gather(*(runner.cleanup() for runner in runners))


def main(argv: Sequence[str] | None = None) -> int:
    configs = fleet_configs(argv)
    logging.basicConfig(
        level=configs[0].log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
