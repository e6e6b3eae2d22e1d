"""The multi-process parameter server against the simulator, and under faults.

Every group runs on 127.0.0.1, started by `launch` in this process (its forkserver
imports torch once for all tests); each run has a time limit, and the `group`
fixture kills whatever a failed test leaves behind.
"""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from metagg.checkpoint import load_checkpoint, save_checkpoint
from metagg.config import ConfigError, config_from_dict, save_config
from metagg.runtime.launch import _runtime_args, launch
from metagg.runtime.ps import (
    EXIT_TOO_FEW_WORKERS,
    DistEnv,
    RuntimeOptions,
    build_parser,
    parse_fault,
    resumable,
    runtime_options,
)
from metagg.runtime.ps import main as ps_main
from metagg.simulation import Simulation, read_metrics

BASE = {"rounds": 20, "eval_every": 5, "checkpoint_every": 10,
        "workers": {"num_workers": 3, "batch_size": 16}}
KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "worker_loss",
        "dropped_updates", "skipped_rounds", "missing_updates")
LIMIT = 100.0  # seconds any one launch may take


def config(**sections):
    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config_from_dict(data)


def simulate(cfg, digits, out: Path):
    Simulation(cfg, dataset=digits).run(out)
    return read_metrics(out / "metrics.jsonl")


def assert_same_metrics(got, want):
    assert [r["round"] for r in got] == [r["round"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in KEYS:
            if w[key] is None:
                assert g[key] is None, (g["round"], key)
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-4), (g["round"], key)


def pids(out: Path) -> dict:
    return json.loads((out / "launch/pids.json").read_text())


@pytest.fixture
def group():
    """Starts `launch` in a thread; afterwards stops it, which kills its processes."""
    started: list[tuple[threading.Thread, threading.Event, Path]] = []

    def start(cfg, out: Path, **kwargs):
        result: dict = {}
        stop = threading.Event()

        def target():
            result["code"] = launch(cfg, out, time_limit=LIMIT, stop=stop, **kwargs)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        started.append((thread, stop, out))
        return thread, result

    yield start
    for thread, stop, out in started:
        stop.set()
        thread.join(timeout=30)
        if (out / "launch/pids.json").exists():  # last resort: the last attempt's processes
            info = pids(out)
            for pid in [info["server"], *info["workers"].values()]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def wait_for_round(out: Path, round: int, thread: threading.Thread, timeout: float = LIMIT):
    """Wait until metrics.jsonl has a row for `round` or later; return that row's round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        rows = read_metrics(out / "metrics.jsonl")
        if rows and rows[-1]["round"] >= round:
            return rows[-1]["round"]
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach round {round}")


# --------------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("setting", [
    # gradient mode, worker momentum, the server plays ALIE for worker 0, a robust
    # rule aggregates
    {"workers": {"num_workers": 4, "momentum": 0.9},
     "attack": {"name": "alie", "num_byzantine": 1},
     "aggregator": {"name": "trimmed_mean"}},
    # local SGD, worker 0 trains on flipped labels in its own process
    {"workers": {"mode": "local_sgd", "local_steps": 2, "local_lr": 0.2},
     "attack": {"name": "label_flip", "num_byzantine": 1}, "optimizer": {"name": "adam",
                                                                         "lr": 0.01}},
], ids=["gradient-alie", "local_sgd-label_flip"])
def test_distributed_run_equals_simulator(digits, tmp_path, group, setting):
    cfg = config(**setting)
    launch_equals_simulator(cfg, digits, tmp_path, group)
    for name in ("summary.json", "checkpoint.json", "checkpoint.safetensors", "config.yaml",
                 "runtime.json"):
        assert (tmp_path / "ps" / name).exists(), name
    stats = json.loads((tmp_path / "ps/runtime.json").read_text())
    m, d = cfg.workers.num_workers, stats["dimension"]
    assert stats["rounds"] == 20
    assert stats["bytes_received"] == 20 * m * d * 4  # every update, once


def test_compiled_distributed_run_equals_compiled_simulator(digits, tmp_path, group,
                                                           monkeypatch):
    # every process compiles its workers' round (the worker processes inherit the setting)
    monkeypatch.setenv("METAGG_COMPILE", "1")
    cfg = config(workers={"mode": "local_sgd", "local_steps": 2, "local_lr": 0.2})
    launch_equals_simulator(cfg, digits, tmp_path, group)


def launch_equals_simulator(cfg, digits, tmp_path: Path, group) -> None:
    """`launch` into tmp_path/ps gives the simulator's metrics (tmp_path/sim), no one missing."""
    want = simulate(cfg, digits, tmp_path / "sim")
    thread, result = group(cfg, tmp_path / "ps")
    thread.join(LIMIT + 10)
    assert result["code"] == 0
    got = read_metrics(tmp_path / "ps/metrics.jsonl")
    assert_same_metrics(got, want)
    assert got[-1]["missing_updates"] == 0


# --------------------------------------------------------------------------- faults


def test_killed_worker_run_finishes_with_the_others(digits, tmp_path, group):
    cfg = config(rounds=40)
    out = tmp_path / "ps"
    # delay:all paces the rounds (50 ms) so that the kill lands mid-run.
    opts = RuntimeOptions(heartbeat_timeout=3.0, faults=[parse_fault("delay:all:0.05")])
    thread, result = group(cfg, out, options=opts)
    killed_at = wait_for_round(out, 10, thread)
    os.kill(pids(out)["workers"]["2"], signal.SIGKILL)
    thread.join(LIMIT + 10)
    assert result["code"] == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["round"] == 40
    assert all(r["missing_updates"] == 0 for r in rows if r["round"] <= killed_at)
    # Worker 2 is absent from (about) the kill to the end, and from then on only it.
    missing = rows[-1]["missing_updates"]
    assert 40 - killed_at - 5 <= missing <= 40 - killed_at + 5
    assert math.isfinite(rows[-1]["train_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_updates"] == missing
    assert json.loads((out / "runtime.json").read_text())["live_workers"] == 2
    assert "presumed dead" in (out / "launch/attempt0.rank0.log").read_text()


def test_killed_server_restarts_and_matches_uninterrupted_run(digits, tmp_path, group):
    cfg = config(rounds=40)
    want = simulate(cfg, digits, tmp_path / "sim")
    out = tmp_path / "ps"
    opts = RuntimeOptions(faults=[parse_fault("delay:all:0.05")])
    thread, result = group(cfg, out, options=opts)
    wait_for_round(out, 20, thread)
    os.kill(pids(out)["server"], signal.SIGKILL)
    thread.join(LIMIT + 10)
    assert result["code"] == 0
    assert pids(out)["attempt"] == 1  # the group was started a second time
    assert_same_metrics(read_metrics(out / "metrics.jsonl"), want)
    # Asking to resume the finished run changes nothing.
    assert launch(cfg, out, resume=True, time_limit=LIMIT) == 0
    assert_same_metrics(read_metrics(out / "metrics.jsonl"), want)


def test_nan_worker_dropped_and_straggler_counted_missing(digits, tmp_path, group):
    cfg = config(rounds=4, eval_every=2)
    out = tmp_path / "ps"
    # rank 1 sends NaN every round; rank 3 takes 1.5 s per update against a 0.6 s deadline.
    opts = RuntimeOptions(round_timeout=0.6,
                          faults=[parse_fault("nan:1"), parse_fault("delay:3:1.5")])
    thread, result = group(cfg, out, options=opts)
    thread.join(LIMIT + 10)
    assert result["code"] == 0
    rows = read_metrics(out / "metrics.jsonl")
    last = rows[-1]
    assert last["round"] == 4
    assert 1 <= last["dropped_updates"] <= 4  # rank 1's NaN never reaches the aggregator
    assert last["missing_updates"] >= 4  # rank 3 missed every deadline
    assert math.isfinite(last["train_loss"])
    stats = json.loads((out / "runtime.json").read_text())
    assert stats["late_discarded"] >= 1  # its late update was received and thrown away
    assert stats["live_workers"] == 3  # slow is not dead


def test_stale_checkpoint_in_out_is_not_resumed_after_a_restart(digits, tmp_path, group,
                                                                capsys):
    """A launch into an older run's directory, without --resume, whose server dies
    before writing its first checkpoint: the restart starts afresh instead of
    continuing the older run from its checkpoint."""
    cfg = config()
    want = simulate(cfg, digits, tmp_path / "sim")
    out = tmp_path / "ps"
    # The older run (same config) stopped at round 10; its θ is zeroed so that
    # continuing from it would show in the metrics.
    Simulation(cfg, dataset=digits).run(out, stop_after=10)
    tensors, meta = load_checkpoint(out / "checkpoint")
    meta.pop("sha256")
    save_checkpoint(out / "checkpoint", {**tensors, "params": torch.zeros_like(tensors["params"])},
                    meta)
    thread, result = group(cfg, out)
    deadline = time.monotonic() + LIMIT
    while not (out / "launch/pids.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pids(out)["server"], signal.SIGKILL)  # long before its round-10 checkpoint
    thread.join(LIMIT + 10)
    assert result["code"] == 0
    assert pids(out)["attempt"] == 1
    assert_same_metrics(read_metrics(out / "metrics.jsonl"), want)
    assert "resuming" not in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint")[1]["run_id"] == pids(out)["run_id"]


def test_worker_failing_at_startup_stops_the_launch_at_once(tmp_path, group, capsys):
    out = tmp_path / "ps"
    start = time.monotonic()
    thread, result = group(config(), out, options=RuntimeOptions(faults=[parse_fault("fail:2")]))
    thread.join(LIMIT + 10)
    assert time.monotonic() - start < 20  # not the 300 s start-up timeout, nor restarts
    assert result["code"] == 1
    err = capsys.readouterr().err
    assert "worker rank 2 exited with code 1 during start-up: rank 2: failed: injected fault" in err
    assert "restarting" not in err
    assert pids(out)["attempt"] == 0


def test_all_workers_killed_stops_the_run_with_an_error(tmp_path, group, capsys):
    cfg = config(rounds=400)
    out = tmp_path / "ps"
    opts = RuntimeOptions(heartbeat_timeout=2.0, faults=[parse_fault("delay:all:0.05")])
    thread, result = group(cfg, out, options=opts)
    wait_for_round(out, 5, thread)
    for pid in pids(out)["workers"].values():
        os.kill(pid, signal.SIGKILL)
    thread.join(LIMIT + 10)
    assert result["code"] == EXIT_TOO_FEW_WORKERS
    lines = [line for line in capsys.readouterr().err.splitlines() if "live worker" in line]
    assert len(lines) == 1
    assert "0 live worker(s) left, fewer than the 1 that mean needs" in lines[0]
    assert "restarting" not in lines[0] and pids(out)["attempt"] == 0
    assert read_metrics(out / "metrics.jsonl")[-1]["round"] < 400


def test_worker_that_never_answers_is_dead_after_max_missed_rounds(tmp_path, group):
    """Rank 3's heartbeat goes on but its updates take far longer than the rounds."""
    out = tmp_path / "ps"
    opts = RuntimeOptions(round_timeout=0.5, max_missed_rounds=3,
                          faults=[parse_fault("delay:3:4")])
    thread, result = group(config(rounds=10), out, options=opts)
    thread.join(LIMIT + 10)
    assert result["code"] == 0
    assert json.loads((out / "runtime.json").read_text())["live_workers"] == 2
    assert "left its last 3 rounds unanswered" in (out / "launch/attempt0.rank0.log").read_text()
    assert read_metrics(out / "metrics.jsonl")[-1]["missing_updates"] >= 10


def test_checkpoint_killed_between_its_two_files_still_loads(tmp_path):
    """A server killed between writing checkpoint.safetensors and checkpoint.json (the
    restart test hit this) resumes from the new checkpoint, not a refused pair."""
    path = tmp_path / "checkpoint"
    save_checkpoint(path, {"params": torch.zeros(3)}, {"round": 10})
    old_json = path.with_suffix(".json").read_text()
    save_checkpoint(path, {"params": torch.ones(3)}, {"round": 20})
    path.with_suffix(".json").write_text(old_json)  # the JSON rename never happened
    tensors, meta = load_checkpoint(path)
    assert meta["round"] == 20 and torch.equal(tensors["params"], torch.ones(3))


# --------------------------------------------------------------------------- bad input


def test_fault_and_option_errors_are_one_line():
    assert parse_fault("delay:all:0.5").seconds == 0.5
    assert parse_fault("nan:2").rank == 2
    for bad in ("nan", "nan:0", "delay:1", "delay:1:-2", "boom:1"):
        with pytest.raises(ValueError, match="--fault"):
            parse_fault(bad)
    assert parse_fault("fail:all").rank is None
    with pytest.raises(ValueError, match="round-timeout must be > 0"):
        RuntimeOptions(round_timeout=0)
    with pytest.raises(ValueError, match="max-missed-rounds must be >= 1"):
        RuntimeOptions(max_missed_rounds=0)
    with pytest.raises(ConfigError, match="torchrun"):
        DistEnv.from_environ({})
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "x",
                              "MASTER_PORT": "1"})


def test_launch_passes_every_runtime_option_to_the_processes():
    opts = RuntimeOptions(round_timeout=3.5, heartbeat_timeout=4.0, startup_timeout=5.0,
                          max_missed_rounds=2, backend="gloo", threads=2,
                          faults=[parse_fault("delay:all:0.5"), parse_fault("nan:1"),
                                  parse_fault("fail:2")])
    args = build_parser().parse_args(["--out", "x", *_runtime_args(opts)])
    assert runtime_options(args) == opts


def test_restart_resumes_by_itself_only_under_torchrun_and_from_its_own_run(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    launched = DistEnv.from_environ({**env, "METAGG_ATTEMPT": "1", "METAGG_RUN_ID": "abc"})
    assert (launched.attempt, launched.elastic, launched.run_id) == (1, False, "abc")
    elastic = DistEnv.from_environ({**env, "TORCHELASTIC_RESTART_COUNT": "2",
                                    "TORCHELASTIC_RUN_ID": "none"})
    assert (elastic.attempt, elastic.elastic, elastic.run_id) == (2, True, None)
    assert not resumable(tmp_path, None)
    save_checkpoint(tmp_path / "checkpoint", {"params": torch.zeros(3)}, {"run_id": "abc"})
    assert resumable(tmp_path, "abc") and resumable(tmp_path, None)
    assert not resumable(tmp_path, "xyz")


def test_ps_rejects_wrong_world_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert ps_main(["--set", "workers.num_workers=4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "start 5 processes" in err and len(err.strip().splitlines()) == 1


def launch_main(argv):
    from metagg.cli import main

    return main(["launch", *argv])


def test_launch_rejects_bad_input(tmp_path, capsys):
    assert launch_main(["--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert launch_main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert launch_main(["--out", str(tmp_path), "--set", "attack.num_byzantine=5",
                        "--set", "attack.name=zero", "--workers", "3"]) == 2
    assert "num_byzantine" in capsys.readouterr().err


# --------------------------------------------------------------------------- torchrun


def children_with_rank(parent: int, rank: int) -> list[int]:
    """Child processes of `parent` whose environment says RANK=`rank` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in env:
                    found.append(int(child))
    return found


@pytest.mark.slow
def test_torchrun_restart_after_server_kill_equals_simulator(digits, tmp_path):
    """Under torchrun (its agent hosts the store), a killed server restarts the group
    (--max-restarts) and the new attempt resumes from the checkpoint by itself."""
    cfg = config(rounds=40)
    want = simulate(cfg, digits, tmp_path / "sim")
    cfg_path = tmp_path / "c.yaml"
    save_config(cfg, cfg_path)
    out = tmp_path / "ps"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "4", "--max-restarts", "1",
           "-m", "metagg.runtime.ps", str(cfg_path), "--out", str(out),
           "--fault", "delay:all:0.05"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            rows = read_metrics(out / "metrics.jsonl")
            if rows and rows[-1]["round"] >= 20:
                break
            time.sleep(0.05)
        servers = children_with_rank(proc.pid, 0)
        assert len(servers) == 1, "did not find the server process"
        os.kill(servers[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output.decode()[-3000:]
    assert_same_metrics(read_metrics(out / "metrics.jsonl"), want)
    assert load_checkpoint(out / "checkpoint")[1]["run_id"]  # torchrun's rdzv id


def test_aggregator_chosen_local_lr_reaches_the_worker_processes(digits, tmp_path, group):
    """A general LAgg-A that sets the workers' lr each round: the processes train with
    the lr sent with θ, so the distributed run still equals the simulator."""
    from metagg.learned.lagg import LAggA, save_lagg

    agg = LAggA(step_mode="general", residual_base="momentum", residual_scale=0.6,
                correction_scale=0.0, local_lr=0.2, local_lr_gain=0.1)
    save_lagg(tmp_path / "agg", agg, trained_on={})
    cfg = config(workers={"mode": "local_sgd", "local_steps": 2, "local_lr": 0.2},
                 aggregator={"name": f"lagg:{tmp_path / 'agg'}"})
    launch_equals_simulator(cfg, digits, tmp_path, group)
    lrs = [r["local_lr"] for r in read_metrics(tmp_path / "ps/metrics.jsonl")]
    assert lrs == [r["local_lr"] for r in read_metrics(tmp_path / "sim/metrics.jsonl")]
    assert lrs[0] == pytest.approx(0.2) and len(set(lrs)) == len(lrs)  # it moved
