"""Which vLLM flags an operator may give a model (`Model.engine_args`): an allow-list.

An operator tunes an engine; an operator never gets a shell through it. So a flag is taken
only when it is listed here, and the refused ones that people ask for are listed with the
reason, by class:

- network: the engine listens on 127.0.0.1, on a port the agent picks, behind the agent's
  authentication; a flag that binds it elsewhere, opens another listener or sends data
  off the host would put a GPU's API where nobody checks who calls it;
- code: the flag runs code that is not vLLM's own (plugins, custom classes, the
  checkpoint's Python, templates or processors a request brings). The checkpoint's code
  runs only through the model's own `trust_remote_code` field, which needs its own
  permission on the control plane and the agent's consent (`AGENT_ALLOW_REMOTE_CODE`);
- paths: the flag reads or writes a path outside the model's directory (another model,
  a config file holding more flags, a log config, a template on the host's disk);
- agent: the agent sets it itself (the model's directory and served name, sleep mode).

Both sides check: the control plane when a model is written, the agent before it starts an
engine, since an older control plane (or anyone holding the agent's credential) may send
anything. This module never imports Django: the agent and the control plane share it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    """An allowed flag: whether it takes a value (`many`: one or more, as argparse's nargs=+),
    and which values when only some are safe."""

    takes_value: bool = True
    choices: tuple[str, ...] = ()
    many: bool = False


_BOOL = Flag(takes_value=False)
_VALUE = Flag()

ALLOWED: dict[str, Flag] = {
    # What the model is, numerically
    "--dtype": _VALUE,
    "--max-model-len": _VALUE,
    "--quantization": _VALUE,
    "--kv-cache-dtype": _VALUE,
    "--seed": _VALUE,
    "--max-logprobs": _VALUE,
    "--logprobs-mode": _VALUE,
    "--override-generation-config": _VALUE,  # sampling defaults (JSON): no code, no path
    "--runner": Flag(choices=("auto", "generate", "pooling", "draft")),
    "--convert": Flag(choices=("auto", "none", "embed", "classify", "reward", "mm_encoder_only")),
    "--pooler-config": _VALUE,
    "--limit-mm-per-prompt": _VALUE,
    "--disable-sliding-window": _BOOL,
    "--disable-cascade-attn": _BOOL,
    "--skip-tokenizer-init": _BOOL,
    "--language-model-only": _BOOL,
    # Memory and scheduling
    "--gpu-memory-utilization": _VALUE,
    "--kv-cache-memory-bytes": _VALUE,
    "--cpu-offload-gb": _VALUE,
    "--num-gpu-blocks-override": _VALUE,
    "--block-size": _VALUE,
    "--max-num-seqs": _VALUE,
    "--max-num-batched-tokens": _VALUE,
    "--long-prefill-token-threshold": _VALUE,
    "--enable-prefix-caching": _BOOL,
    "--prefix-caching-hash-algo": _VALUE,
    "--enable-chunked-prefill": _BOOL,
    "--async-scheduling": _BOOL,
    "--scheduling-policy": Flag(choices=("fcfs", "priority")),
    "--stream-interval": _VALUE,
    "--enforce-eager": _BOOL,
    "--optimization-level": _VALUE,
    "--performance-mode": _VALUE,
    "--max-cudagraph-capture-size": _VALUE,
    "--cudagraph-capture-sizes": Flag(many=True),
    "--attention-backend": _VALUE,
    "--kv-sharing-fast-prefill": _BOOL,
    # Parallelism on this host
    "--tensor-parallel-size": _VALUE,
    "--pipeline-parallel-size": _VALUE,
    "--data-parallel-size": _VALUE,
    "--enable-expert-parallel": _BOOL,
    # Not ray: ray.init() joins (or starts) a cluster whose workers take unauthenticated jobs.
    "--distributed-executor-backend": Flag(choices=("mp", "uni")),
    "--disable-custom-all-reduce": _BOOL,
    "--api-server-count": _VALUE,
    "--numa-bind": _BOOL,
    # LoRA (the control plane adds these for a base with adapters)
    "--enable-lora": _BOOL,
    "--max-loras": _VALUE,
    "--max-lora-rank": _VALUE,
    "--max-cpu-loras": _VALUE,
    "--lora-dtype": _VALUE,
    "--fully-sharded-loras": _BOOL,
    # The OpenAI server's behaviour
    "--enable-auto-tool-choice": _BOOL,
    "--tool-call-parser": _VALUE,  # one of vLLM's own parsers, by name
    "--reasoning-parser": _VALUE,
    "--chat-template-content-format": Flag(choices=("auto", "string", "openai")),
    "--response-role": _VALUE,
    "--enable-prompt-tokens-details": _BOOL,
    "--enable-force-include-usage": _BOOL,
    "--return-tokens-as-token-ids": _BOOL,
    "--max-log-len": _VALUE,
    "--enable-log-requests": _BOOL,
    "--disable-log-stats": _BOOL,
    "--disable-uvicorn-access-log": _BOOL,
    "--uvicorn-log-level": _VALUE,
    "--disable-fastapi-docs": _BOOL,
    "--enable-server-load-tracking": _BOOL,
    "--shutdown-timeout": _VALUE,  # the agent still kills it after AGENT_STOP_GRACE
}

NETWORK, CODE, PATHS, AGENT = "network", "code", "paths", "agent"

REASONS = {
    NETWORK: "it would bind the engine elsewhere, open another listener or send data off the "
    "host (the engine listens on 127.0.0.1 behind the agent)",
    CODE: "it runs code that is not vLLM's own (the checkpoint's code only through the "
    "model's trust_remote_code field)",
    PATHS: "it reads or writes a path outside the model's directory",
    AGENT: "the agent sets it itself",
}

_REFUSED_BY_CLASS: dict[str, tuple[str, ...]] = {
    NETWORK: (
        "--host", "--port", "--uds", "--root-path", "--grpc", "--grpc-port", "--headless",
        "--data-parallel-address", "--data-parallel-rpc-port", "--data-parallel-start-rank",
        "--data-parallel-rank", "--data-parallel-external-lb", "--data-parallel-hybrid-lb",
        "--master-addr", "--master-port", "--nnodes", "--node-rank", "--api-key",
        "--allowed-origins", "--allow-credentials", "--allowed-methods", "--allowed-headers",
        "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs",
        "--ssl-ciphers", "--enable-ssl-refresh", "--otlp-traces-endpoint",
        "--kv-events-config", "--kv-transfer-config", "--ec-transfer-config",
        "--allowed-media-domains", "--tool-server", "--hf-token",
    ),
    CODE: (
        "--trust-remote-code", "--middleware", "--worker-cls", "--worker-extension-cls",
        "--scheduler-cls", "--logits-processors", "--tool-parser-plugin",
        "--reasoning-parser-plugin", "--io-processor-plugin", "--model-class-overrides",
        "--model-impl", "--compilation-config", "--kernel-config", "--hf-overrides",
        "--additional-config", "--trust-request-chat-template", "--trust-request-mm-kwargs",
        "--mm-processor-kwargs", "--tokenizer-mode", "--chat-template", "--json-arg",
        "--speculative-config", "--spec-model", "--spec-method", "--load-format",
        "--model-loader-extra-config",
    ),
    PATHS: (
        "--config", "--tokenizer", "--download-dir", "--generation-config", "--lora-modules",
        "--default-mm-loras", "--allowed-local-media-path", "--log-config-file",
        "--logging-config", "--hf-config-path", "--profiler-config",
        "--mm-encoder-fp8-scale-path", "--mm-encoder-fp8-scale-save-path", "--revision",
        "--code-revision", "--tokenizer-revision",
    ),
    AGENT: ("--model", "--served-model-name", "--enable-sleep-mode"),
}  # fmt: skip
REFUSED = {flag: why for why, flags in _REFUSED_BY_CLASS.items() for flag in flags}

_NUMBER = re.compile(r"-\d+(\.\d+)?([eE][-+]?\d+)?")


class EngineArgsRefused(ValueError):
    """Engine arguments outside the policy; the message names each refused one and why."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def canonical(name: str) -> str:
    """A flag's name as vLLM reads it: underscores are dashes (`--max_model_len`)."""
    return "--" + name[2:].replace("_", "-")


def _refusal(name: str) -> str:
    reason = REFUSED.get(name)
    if reason is not None:
        return f"{name} is not allowed: {REASONS[reason]}"
    if "." in name:
        return f"{name} is not allowed: give the whole flag as JSON, on the allow-list only"
    return (
        f"{name} is not on the allow-list of engine arguments (docs/engines.md: Engine arguments)"
    )


def _is_value(item: str) -> bool:
    return not item.startswith("-") or bool(_NUMBER.fullmatch(item))


def problems(args: Sequence[object]) -> list[str]:
    """What is wrong with `args` as a model's engine arguments: empty when all are allowed."""
    found: list[str] = []
    items = list(args)
    index = 0
    while index < len(items):
        item = items[index]
        index += 1
        if not isinstance(item, str):
            found.append(f"{item!r} is not a string")
            continue
        if not item.startswith("--"):
            what = "a short flag" if item.startswith("-") else "a value with no flag before it"
            found.append(f"{item!r} is {what}: give each flag in its long form, --name value")
            continue
        name, equals, value = item.partition("=")
        name = canonical(name)
        negated = name.startswith("--no-") and ALLOWED.get("--" + name[5:]) == _BOOL
        flag = _BOOL if negated else ALLOWED.get(name)
        if flag is None:
            found.append(_refusal(name))
            following = items[index] if index < len(items) else None
            if not equals and isinstance(following, str) and _is_value(following):
                index += 1  # its value, most likely: one problem per refused flag
            continue
        if not flag.takes_value:
            if equals:
                found.append(f"{name} takes no value")
            continue
        values = [value] if equals else []
        while index < len(items) and (not values or flag.many):
            following = items[index]
            if not isinstance(following, str) or not _is_value(following):
                break
            values.append(following)
            index += 1
        if not values:
            found.append(f"{name} needs a value")
        for value in values:
            if "\x00" in value or "\n" in value:
                found.append(f"{name}'s value holds a control character")
            elif flag.choices and value not in flag.choices:
                found.append(f"{name} takes one of {', '.join(flag.choices)}, not {value!r}")
    return found


def check(args: Sequence[object]) -> None:
    """Raise EngineArgsRefused naming every argument outside the policy."""
    if found := problems(args):
        raise EngineArgsRefused(found)
