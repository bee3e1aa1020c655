"""A stand-in for vLLM's OpenAI server, run by a plain `python3` as an engine would be: it
says what it was started with (its user, its environment, which files it could read) in a
JSON report, then answers /health and /v1/models until it is stopped.

Usage (as the agent runs an engine): python3 fake_vllm.py -m vllm... --port N
    --served-model-name M ...; the report goes to $LLMFLEET_TEST_REPORT.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def argument(name: str) -> str:
    return sys.argv[sys.argv.index(name) + 1]


def readable(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError:
        return False
    return True


def main() -> None:
    model, port = argument("--served-model-name"), int(argument("--port"))
    agent = os.getppid()
    report = {
        "uid": os.getuid(),
        "argv": sys.argv[1:],
        "environ": dict(os.environ),
        "read_credential": readable(os.environ["LLMFLEET_TEST_CREDENTIAL"]),
        "read_agent_environ": readable(f"/proc/{agent}/environ"),
    }
    with open(os.environ["LLMFLEET_TEST_REPORT"], "w") as out:
        json.dump(report, out)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (
                b"{}"
                if self.path == "/health"
                else json.dumps(
                    {"object": "list", "data": [{"id": model, "object": "model"}]}
                ).encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
