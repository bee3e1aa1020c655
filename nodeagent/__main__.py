"""`python -m nodeagent`: run the node agent (see --help for every setting)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from nodeagent.config import parse_config
from nodeagent.server import AgentServer


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(AgentServer(config).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
