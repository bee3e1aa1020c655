"""GPU facts from NVML (`nvidia-ml-py`, module `pynvml`).

On a host without a GPU, or without the NVIDIA driver, there are no GPUs to
report: the agent says so (an empty list) instead of inventing figures.
"""

from __future__ import annotations

import logging
from typing import Any

from nodeagent.protocol import GpuInfo

log = logging.getLogger(__name__)


class GpuMonitor:
    """Reads every GPU of the host through one NVML session, opened once."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.absent_reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, or NVMLError_LibraryNotFound / _DriverNotLoaded
            self.absent_reason = f"{type(exc).__name__}: {exc}"
            log.info("no GPU facts on this host (%s)", self.absent_reason)
            return
        self.nvml = pynvml

    @property
    def available(self) -> bool:
        return self.nvml is not None

    def snapshot(self) -> list[GpuInfo]:
        """Every GPU now; an empty list without NVML."""
        if self.nvml is None:
            return []
        nvml = self.nvml
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                utilization = None  # not supported on some devices (MIG slices)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                    utilization=utilization,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()
            self.nvml = None


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def main() -> None:
    """`python -m nodeagent.gpu`: print the GPU part of a heartbeat, as JSON."""
    import json
    from dataclasses import asdict

    monitor = GpuMonitor()
    gpus = monitor.snapshot()
    print(json.dumps({"available": monitor.available, "absent_reason": monitor.absent_reason,
                      "gpus": [asdict(gpu) for gpu in gpus]}, indent=2))  # fmt: skip
    monitor.close()


if __name__ == "__main__":
    main()
