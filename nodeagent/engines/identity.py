"""What an engine runs as: a minimal environment, and a user of its own where one is set.

An engine runs code the agent does not control (the model's kernels, a tokenizer's, with
`trust_remote_code` the checkpoint's own), so it gets nothing it does not need: not the
fleet's enrolment token, not the store credentials, not the agent's settings. It inherits
the variables that say how to run vLLM on this host (CUDA, NCCL, OpenMP, vLLM's own...),
never one whose name says it holds a secret, and what the operator names in
AGENT_ENGINE_ENV. With AGENT_ENGINE_USER, engines (standbys too) also run as that user, so
they cannot read the agent's credential file (0600) or its process's environment either.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# Inherited by name or prefix: how this host runs vLLM, nothing about the agent.
_NAMES = frozenset(
    {"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "PYTHONUNBUFFERED",
     "PYTHONHASHSEED", "PYTHONIOENCODING"}
)  # fmt: skip
_PREFIXES = (
    "LC_", "VLLM_", "CUDA_", "NVIDIA_", "NCCL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_",
    "TORCH", "PYTORCH_", "TRITON_", "OMP_", "KMP_", "MKL_", "GOMP_", "ONEDNN_", "DNNL_",
    "UCX_", "CUBLAS_", "CUDNN_",
)  # fmt: skip
# Never inherited unless named in AGENT_ENGINE_ENV (HF_TOKEN, VLLM_API_KEY, ...).
_SECRET = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|(^|_)KEY($|_)|CONNECTION_STRING|(^|_)SAS(_|$)")


def engine_environment(
    environ: Mapping[str, str], named: Iterable[str] = (), home: Path | None = None
) -> dict[str, str]:
    """The environment an engine starts with: the inherited part of `environ`, the variables
    `named` by the operator, and HOME (caches vLLM, Triton and Hugging Face keep there)."""
    chosen = set(named)
    kept = {
        name: value
        for name, value in environ.items()
        if name in chosen
        or ((name in _NAMES or name.startswith(_PREFIXES)) and not _SECRET.search(name))
    }
    if home is not None:
        kept["HOME"] = str(home)
    return kept


@dataclass(frozen=True)
class EngineUser:
    """The user engines run as (AGENT_ENGINE_USER); None of it means the agent's own."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> EngineUser | None:
        """The user named (or numbered) by `name`; None for "". Raises ValueError when there
        is no such user, or when the agent, not being root, cannot run processes as another."""
        if not name:
            return None
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, ValueError):
            raise ValueError(f"no user {name!r} on this host") from None
        if entry.pw_uid != os.geteuid() and os.geteuid() != 0:
            raise ValueError(f"running engines as {name!r} needs the agent to run as root")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def process_options(self) -> dict[str, Any]:
        """What `create_subprocess_exec` takes to start a process as this user, with no
        supplementary group of the agent's. A preexec_fn, not `user`/`group`/`extra_groups`:
        uvloop (the agent's loop) refuses those. It runs in the forked child before exec and
        only makes three system calls, which take no lock a thread of the agent could hold."""
        if self.uid == os.geteuid() != 0:  # the agent's own user: nothing to become
            return {}
        return {"preexec_fn": partial(_become, self.uid, self.gid)}

    def own(self, *paths: Path) -> None:
        """Give this user what it must write: its temporary directory, its compile cache, its
        log, its home (each path, and everything below a directory). Never through a link:
        an engine may have left one there, pointing anywhere, and this runs as root."""
        for path in paths:
            if not path.exists() or path.is_symlink():
                continue
            os.chown(path, self.uid, self.gid, follow_symlinks=False)
            if not path.is_dir():
                continue
            # fwalk holds each directory open: one swapped for a link meanwhile is not entered.
            for _, dirs, files, fd in os.fwalk(path, follow_symlinks=False):
                for name in (*dirs, *files):
                    os.chown(name, self.uid, self.gid, dir_fd=fd, follow_symlinks=False)


def process_options(user: EngineUser | None) -> dict[str, Any]:
    return user.process_options() if user is not None else {}


def own(user: EngineUser | None, *paths: Path) -> None:
    if user is not None:
        user.own(*paths)


def _become(uid: int, gid: int) -> None:
    """In the child, before exec: drop the supplementary groups, then the group, then the user
    (the user last: once it is dropped, the rest is no longer allowed)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
