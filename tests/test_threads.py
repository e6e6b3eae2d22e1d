"""`--threads N|auto` on every command, and the `auto` policy's core accounting
(`metagg.threads`) on fake /proc/stat readings. No timing assertions."""

import argparse

import pytest
import torch

import metagg.threads as threads
from metagg.cli import build_parser
from metagg.threads import (
    AUTO,
    AutoThreads,
    CpuSample,
    apply_threads,
    check_threads,
    cpu_sample,
    others_busy,
    parse_proc_stat,
    threads_during,
    threads_for,
)

# every command that trains: the words before --threads, and its default
COMMANDS = [
    (["run"], AUTO),
    (["compare", "--aggregators", "mean", "--out", "x"], AUTO),
    (["demo"], AUTO),
    (["tune", "--baseline", "fedavg", "--budget", "1", "--out", "x"], AUTO),
    (["launch", "--out", "x"], AUTO),
    (["meta-train", "rnn", "--out", "x"], AUTO),
    (["meta-train", "lagg", "--out", "x"], AUTO),
    (["reproduce", "ji2019", "--out", "x"], 1),  # the committed reports' count
    (["reproduce", "joseph2025", "--out", "x"], 1),
    (["reproduce", "generalization", "--out", "x"], 1),
]


@pytest.fixture(autouse=True)
def restore_threads():
    """Every test leaves torch's count and the policy as it found them."""
    before, policy = torch.get_num_threads(), threads._auto
    yield
    threads._auto = policy
    torch.set_num_threads(before)


@pytest.mark.parametrize("words,default", COMMANDS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else str(v))
def test_every_command_parses_threads(words, default):
    parser = build_parser()
    assert parser.parse_args(words).threads == default
    assert parser.parse_args([*words, "--threads", "auto"]).threads == AUTO
    assert parser.parse_args([*words, "--threads", "AUTO"]).threads == AUTO
    assert parser.parse_args([*words, "--threads", "3"]).threads == 3


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5", ""])
def test_bad_threads_are_clear_errors(words, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*words, "--threads", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: expected an integer >= 1 or 'auto'" in err
    assert repr(bad) in err


def test_help_states_the_default_and_the_float_caveat(capsys):
    for words, default in ((["run"], "auto"), (["reproduce", "ji2019"], "1")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*words, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"(default {default}" in text and "last bits" in text


def test_check_threads():
    assert check_threads(2) == 2 and check_threads("2") == 2 and check_threads(" Auto ") == AUTO
    for bad in (0, -3, True, 1.0, "two", None):
        with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
            check_threads(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        threads.parse_threads("0")


# --------------------------------------------------------------------------- accounting

PROC_STAT = """\
cpu  300 0 100 500 0 0 0 0 0 0
cpu0 100 0 50 400 10 0 0 0 0 0
cpu1 200 5 50 100 0 3 2 40 7 0
intr 12345
ctxt 678
"""


def test_parse_proc_stat_sums_the_cpus_asked_for():
    # cpu0: busy 150, total 560; cpu1: busy 200+5+50+3+2+40 = 300, total 400
    assert parse_proc_stat(PROC_STAT, {0}) == (150, 560)
    assert parse_proc_stat(PROC_STAT, {1}) == (300, 400)
    assert parse_proc_stat(PROC_STAT) == (450, 960)  # the "cpu " total line is not counted
    assert parse_proc_stat(PROC_STAT, {0, 1, 7}) == (450, 960)
    assert parse_proc_stat("cpu0 1 2 3 4\n", None) == (6, 10)  # old kernels: fewer fields


def test_others_busy_subtracts_our_own_cpu_time():
    before = CpuSample(busy=1000, total=5000, own=10.0)
    # 2 CPUs for 2 s at 100 Hz: 400 jiffies; 300 busy = 3 CPU-seconds, 2 of them ours
    after = CpuSample(busy=1300, total=5400, own=12.0)
    assert others_busy(before, after, cpus=2, hz=100) == pytest.approx(0.5)
    # both cores busy, we ran 2 threads that got 1.33 cores: others had 0.67
    after = CpuSample(busy=1400, total=5400, own=10.0 + 2 * 4 / 3)
    assert others_busy(before, after, cpus=2, hz=100) == pytest.approx(2 / 3)
    # our time counted to the nanosecond, the jiffies coarser: never negative
    after = CpuSample(busy=1200, total=5400, own=12.1)
    assert others_busy(before, after, cpus=2, hz=100) == 0.0
    assert others_busy(before, before, cpus=2, hz=100) is None  # no time passed


def test_threads_for():
    assert threads_for(0.0, 2) == 2
    assert threads_for(0.2, 2) == 2  # daemons, an editor: still free
    assert threads_for(0.3, 2) == 1
    assert threads_for(2 / 3, 2) == 1  # a busy loop sharing with our two threads
    assert threads_for(1.0, 2) == 1
    assert threads_for(3.0, 2) == 1  # never fewer than one
    assert threads_for(0.0, 8, cap=4) == 4
    assert threads_for(2.9, 8) == 5


def _samples(*rows):
    it = iter(rows)
    return lambda: next(it)


def test_auto_follows_the_free_cores(monkeypatch):
    hz = 100
    monkeypatch.setattr(threads.os, "sysconf", lambda name: hz)
    # quiet; then a neighbour takes a core while we run 2 threads; then it leaves
    policy = AutoThreads(cpus=2, cap=2, every=0.0, sample=_samples(
        CpuSample(0, 0, 0.0),
        CpuSample(10, 200, 0.1),  # 1 s: 0.1 CPU-s busy, all ours
        CpuSample(210, 400, 1.43),  # 1 s: both cores busy, 1.33 of them ours
        CpuSample(410, 600, 2.43),  # 1 s: both busy, 1.0 ours (now one thread)
        CpuSample(520, 800, 3.43),  # 1 s: the neighbour is gone
    ))
    assert [policy.update() for _ in range(4)] == [2, 1, 1, 2]
    assert torch.get_num_threads() == 2
    assert policy.others == pytest.approx(0.1)


def test_auto_without_proc_stat_is_torchs_default(tmp_path, monkeypatch):
    assert cpu_sample(str(tmp_path / "no-such-file")) is None
    policy = AutoThreads(cpus=2, cap=2, sample=lambda: None)
    assert policy.start(first=0) == 2 and policy.others is None


def test_tick_updates_only_when_due(monkeypatch):
    calls = []

    class Fake:
        due = float("inf")

        def update(self):
            calls.append(1)

    fake = Fake()
    monkeypatch.setattr(threads, "_auto", fake)
    threads.tick()
    assert not calls
    fake.due = 0.0
    threads.tick()
    assert calls == [1]
    monkeypatch.setattr(threads, "_auto", None)
    threads.tick()  # no policy: nothing to do
    assert calls == [1]


def test_apply_threads_sets_torch_threads():
    assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    assert threads._auto is None
    assert apply_threads("2") == 2 and torch.get_num_threads() == 2
    chosen = apply_threads(AUTO)
    assert 1 <= chosen <= max(1, threads._TORCH_DEFAULT)
    assert torch.get_num_threads() == chosen and threads._auto is not None
    apply_threads(1)  # a fixed count ends auto
    assert threads._auto is None and torch.get_num_threads() == 1
    assert apply_threads(None) == 1
    with pytest.raises(ValueError, match="got 0"):
        apply_threads(0)


def test_threads_during_restores_count_and_policy():
    apply_threads(2)
    with threads_during(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and threads._auto is None
    with threads_during(AUTO):
        assert threads._auto is not None
    assert threads._auto is None and torch.get_num_threads() == 2
    with threads_during(None) as n:
        assert n == 2


def test_meta_train_torch_threads_accepts_auto():
    from metagg.learned.meta.train import torch_threads

    apply_threads(1)
    with torch_threads(AUTO):
        assert threads._auto is not None
    assert torch.get_num_threads() == 1 and threads._auto is None
