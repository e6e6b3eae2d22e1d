"""The multi-process runtime: a torch.distributed parameter server and its launcher.

    metagg launch CONFIG.yaml --workers 4 --out runs/ps          # one machine
    torchrun --nproc-per-node 5 -m metagg.runtime.ps CONFIG.yaml --out runs/ps

See `metagg.runtime.ps` for the protocol and what happens when a process fails. Modules:
`protocol` (options, where a process sits, the store), `server` (rank 0), `worker`,
`ps` (a process's entry point), `launch` (all of them on one machine, with restarts).
"""

from __future__ import annotations

from typing import Any

from metagg.runtime.protocol import Fault, RuntimeOptions

__all__ = ["Fault", "RuntimeOptions", "launch"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m metagg.runtime.ps` does not import ps twice (launch does).
    if name == "launch":
        from metagg.runtime.launch import launch

        return launch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
