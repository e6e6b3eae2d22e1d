"""The multi-process runtime: a torch.distributed parameter server and its launcher.

    metagg launch CONFIG.yaml --workers 4 --out runs/ps          # one machine
    torchrun --nproc-per-node 5 -m metagg.runtime.ps CONFIG.yaml --out runs/ps

See `metagg.runtime.ps` for the protocol and what happens when a process fails.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Fault", "RuntimeOptions", "launch"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m metagg.runtime.ps` does not import ps twice.
    if name == "launch":
        from metagg.runtime.launch import launch

        return launch
    if name in ("Fault", "RuntimeOptions"):
        from metagg.runtime import ps

        return getattr(ps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
