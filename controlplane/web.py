"""`python -m controlplane.web`: the web process, `controlplane.asgi:application` under uvicorn.

uvicorn with httptools and uvloop, because every streamed token passes through this
process: daphne (Twisted) registers the socket for writing and unregisters it again for
each chunk it sends, and so cost 0.59x more CPU per relayed chunk and 0.3 ms more per
request (bench/README.md, the warm path). daphne stays supported (`daphne
controlplane.asgi:application` serves the same application, body limit and last writes
included); this is what `make run`, the compose file, the image and the Kubernetes
manifests run.

On SIGTERM it stops listening, lets the requests still open finish for up to
WEB_DRAIN_SECONDS (streams included: clients see them end, not cut), cancels what is left,
then writes the usage and request figures it still holds (the ASGI lifespan's shutdown,
`controlplane.asgi`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn

from controlplane.env import env_int, env_str
from controlplane.webprotocol import HttpProtocol

APPLICATION = "controlplane.asgi:application"


def config(host: str, port: int, drain_seconds: int) -> uvicorn.Config:
    return uvicorn.Config(
        APPLICATION,
        host=host,
        port=port,
        loop="uvloop",
        http=HttpProtocol,  # httptools, a response's head sent with its body (webprotocol)
        ws="websockets-sansio",  # the dashboard's socket
        lifespan="on",  # the shutdown's last writes; a failing start-up stops the process
        timeout_graceful_shutdown=drain_seconds,
        # X-Forwarded-For is not trusted, as daphne did not: the only client address the
        # control plane records is its peer's (behind a load balancer, the balancer's).
        proxy_headers=False,
        server_header=False,
        access_log=False,  # a line per request is the load balancer's job, not a hot path's
        log_config=None,  # Django's LOGGING (controlplane.settings) configures the loggers
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m controlplane.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("--host", default=env_str("WEB_HOST"))
    parser.add_argument("--port", type=int, default=env_int("WEB_PORT"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    drain = env_int("WEB_DRAIN_SECONDS")
    uvicorn.Server(config(args.host, args.port, drain)).run()


if __name__ == "__main__":
    main()
