"""examples/flower end to end, with the one command its README gives.

`flwr run examples/flower --stream --federation-config "num-supernodes=5"` starts a
local SuperLink in simulation mode (Ray), runs 3 rounds and streams the logs. Here it
runs with its own Flower home (a temporary folder, so ~/.flwr is untouched) and its own
loopback port, and the SuperLink it leaves running (Flower's design) is stopped, with
every process it started. Needs flwr[simulation] (skipped without it: CI's install has no
flwr, `pip install -e '.[flower]' -c constraints.txt` adds it); the example itself runs on
the default path (~20 s), the mean-vs-median comparison only with `-m slow`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"
FLWR = Path(sys.executable).parent / "flwr"  # the flwr of the environment running pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_matching(needle: str) -> set[int]:
    """Processes whose command line contains `needle` (Linux /proc)."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.add(int(proc.name))
    return found


def ray_pids() -> set[int]:
    """Ray's processes (raylet, gcs_server, ray:: workers)."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") or b"raylet" in cmd or b"gcs_server" in cmd:
            pids.add(int(proc.name))
    return pids


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies count as gone)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (pids := running(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def stop_local_superlink(home: Path) -> tuple[set[int], set[int]]:
    """Stop the SuperLink `flwr run` started for Flower home `home` (found by its log
    file, which lies in `home`) and its SuperExec; return (found, still running)."""
    links = running(pids_matching(str(home / "local-superlink")))
    execs = set().union(*(pids_matching(f"--parent-pid {p}") for p in links))
    for pid in links:
        os.kill(pid, signal.SIGTERM)  # its SuperExec follows its parent
    left = wait_gone(links | execs, timeout=20)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return links | execs, wait_gone(left, timeout=5)


@pytest.fixture
def flwr_run(tmp_path):
    """Run the example's one command (extra arguments appended) against a SuperLink of
    this test's own; returns (summary dict, stdout). Stops everything afterwards."""
    if not FLWR.exists():
        pytest.skip(f"no flwr command beside {sys.executable}")
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           # `flwr run` starts `flower-superlink` by name
           "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ray_before = ray_pids()
    runs: list[str] = []

    def run(*extra: str) -> tuple[dict, str]:
        summary = tmp_path / f"summary-{len(runs)}.json"
        runs.append(str(summary))
        cmd = [str(FLWR), "run", str(EXAMPLE), "--stream",
               "--federation-config", "num-supernodes=5",
               "--run-config", f"summary='{summary}'", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert summary.exists(), proc.stdout + proc.stderr
        return json.loads(summary.read_text()), proc.stdout

    try:
        yield run
    finally:
        found, left = stop_local_superlink(home)
        left |= wait_gone(ray_pids() - ray_before, timeout=30)
        assert not left, f"processes left running: {sorted(left)}"
    assert found or not runs, f"no SuperLink found for {home}: left running elsewhere?"


def test_the_flower_example_runs_with_one_command(flwr_run):
    start = time.monotonic()
    median, out = flwr_run()
    took = time.monotonic() - start
    assert median["aggregator"] == "median" and median["f"] == 1
    assert median["clients"] == 5 and median["num_byzantine"] == 1 and median["rounds"] == 3
    acc = median["test_accuracy"]  # before training, then after each round
    assert len(acc) == 4 and acc[0] < 0.2 and acc[-1] > 0.75, acc
    assert median["skipped_rounds"] == 0 and median["dropped_updates"] == 0
    assert "metagg median: round 3, test accuracy" in out
    assert took < 120, f"the example took {took:.0f} s"


@pytest.mark.slow
def test_one_byzantine_client_ruins_the_mean_in_the_example(flwr_run):
    # the README's second command
    mean, _ = flwr_run("--run-config", "aggregator='mean'")
    assert mean["aggregator"] == "mean" and mean["test_accuracy"][-1] < 0.3
