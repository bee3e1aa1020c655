"""`python -m nodeagent`: run the node agent (see --help for every setting).

`python -m nodeagent publish LOCAL_DIR URI` publishes a checkpoint to a store instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nodeagent.config import parse_config
from nodeagent.server import AgentServer
from nodeagent.store import StoreError
from nodeagent.store.publish import publish


def publish_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent publish",
        description="Publish a Hugging Face checkpoint directory to a model store, with its "
        "manifest (sizes, sha256 and BLAKE3) written last. Credentials come from the "
        "environment: Azure's AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_URL "
        "with AZURE_STORAGE_SAS_TOKEN or AZURE_STORAGE_KEY); AWS's standard variables, "
        "profiles and roles (AWS_ENDPOINT_URL_S3 for an S3-compatible store); "
        "GOOGLE_APPLICATION_CREDENTIALS or Application Default Credentials.",
    )
    parser.add_argument("local_dir", type=Path, help="the checkpoint directory")
    parser.add_argument(
        "uri",
        help="azure://<container>/<prefix>, s3://<bucket>/<prefix>, gs://<bucket>/<prefix> or "
        "file:///<directory>",
    )
    args = parser.parse_args(argv)
    try:
        manifest = publish(args.local_dir, args.uri, os.environ)
    except StoreError as exc:
        print(f"publish failed ({exc.code}): {exc}", file=sys.stderr)
        return 1
    print(f"published {args.uri}: {len(manifest.files)} files, {manifest.total_size} bytes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["publish"]:
        return publish_main(arguments[1:])
    config = parse_config(arguments)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.event_loop == "uvloop":
        # Every relayed chunk wakes the loop twice (the engine's bytes in, the caller's out):
        # uvloop does both in C (bench/README.md, the warm path).
        import uvloop

        uvloop.run(AgentServer(config).serve())
    else:
        asyncio.run(AgentServer(config).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
