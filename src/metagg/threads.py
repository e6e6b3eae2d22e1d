"""torch's intra-op thread count: a fixed number, or `auto` — the cores other processes
leave free, re-checked every few seconds while a simulation runs.

    metagg run CONFIG --threads auto      # the default (reproduce's is 1)
    metagg run CONFIG --threads 1         # fixed: what bit-exact comparisons need

    apply_threads("auto")                 # Python: choose now, re-check from tick()
    with threads_during(1): ...           # set inside a block, restored after

Why. torch runs its ops on OpenMP (libgomp): a parallel op splits its work over the N
threads of the team and waits at a barrier for the last one; between ops the idle
threads spin (GOMP_SPINCOUNT) so that the next op starts at once. A local-SGD round is
~10³ small ops. Measured 2026-12-06 on a 2-core AMD EPYC VM (Linux 6.18), torch 2.13
(libgomp, MKL), Fashion-MNIST 784-128-128, K = 8, H = 4, B = 128, local-SGD mode:

- next to a one-thread job of another session (a `metagg meta-train`), 2 threads ran
  FedAvg at 0.8-1.0 rounds/s and LAgg-A at 0.4 (34 and 25 quiet; 1 thread: 21 and 14).
  Linux's autogroup scheduling shares the CPU between sessions first: our session gets
  one core, our two threads take turns on it, and each parallel op waits a scheduler
  slice for the thread that is not running. A CPU hog in our own session is shared per
  thread and costs less: 34 → 9-11 rounds/s;
- per op (a 128×784 @ 784×128 matmul, 3 000 calls with ~10 µs of Python between; hog
  in our session): 2 threads 145 µs mean quiet, 578 µs busy, p99 16 ms; 1 thread 265
  µs either way. `perf` puts 34 % of the busy process's samples in libgomp's spin and
  barrier code (11 % quiet); it burns 1.3 cores for a third of its quiet speed;
- OMP_WAIT_POLICY=PASSIVE removes the loss (FedAvg 2 threads next to the other
  session's job: 18.4, as 1 thread) and the gain with it: on a quiet machine two
  sleeping threads are no faster than one (17.4), every op then paying a futex wake (a
  400k-element add: 22 → 89 µs). GOMP_SPINCOUNT=1000 lies in between (26 quiet, 15-16
  busy). Both can only be set before torch loads libgomp.

So the spinning that makes two threads 1.6× faster on a quiet machine is what makes
them 3-35× slower when a core is taken. The cure kept here is to never run more
threads than there are free cores:

`auto` = min(torch's own default, the cores not used by other processes), at least 1.
"Used by others" = the busy time of this process's CPUs in /proc/stat (user, nice,
system, irq, softirq, steal) minus this process's own CPU time, over the last interval;
a core counts as taken once others use more than `SLACK` of it. The first choice
samples 0.1 s; afterwards `tick()` (called once per simulated round: a clock read)
re-samples every `EVERY` seconds, so a job that starts later costs at most one round
plus `EVERY` seconds at the wrong count. Without /proc/stat (not Linux) `auto` is
torch's default. With one core busy auto runs 1 thread and keeps 54-65 % of its quiet
rounds/s on the local-SGD tasks, 76-105 % on the robust rules in gradient mode
(benchmarks/throughput.py; the README's Speed section has the table). A change of
thread count can change float reductions in the last bits, so runs that must match
bit for bit (resume tests, golden files) use a fixed count.

Also measured, not changed here: a parallel torch op in a long-lived Python thread
gives that thread an OpenMP team of its own; once the process holds more OpenMP
threads than cores, libgomp throttles every team's spinning, and two threads then use
~1.4 cores: FedAvg 33 → 20-25 rounds/s on a quiet machine. The robust kernels' block
threads (`metagg.robust._core.map_blocks`, at >= 2 threads) do this for the rest of
the process.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

__all__ = ["AUTO", "EVERY", "SLACK", "AutoThreads", "CpuSample", "add_threads_arg",
           "apply_threads", "check_threads", "cpu_sample", "free_cores", "others_busy",
           "parse_proc_stat", "parse_threads", "threads_during", "threads_for", "tick"]

AUTO = "auto"
EVERY = 2.0  # seconds between re-evaluations: a busy neighbour costs at most ~2 s at N threads
SLACK = 0.25  # others may use this much of a core before it counts as taken (daemons, ssh)
FIRST_SAMPLE = 0.1  # seconds sampled before the first choice (20 jiffies on 2 cores)
PROC_STAT = "/proc/stat"
THREADS_HELP = ("torch threads: an integer >= 1, or auto = the cores other processes leave "
                "free, re-checked every few seconds (with one core taken by another job, two "
                "threads ran up to 35x slower than one). Float sums can differ in the last "
                "bits between thread counts: use a fixed count to compare runs bit for bit")

Threads = int | str  # an int >= 1 or AUTO


def check_threads(value: object) -> Threads:
    """`value` as a thread setting: an int >= 1 or AUTO ("auto", any case; "2" → 2).

    Raises:
        ValueError: anything else, with the value.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == AUTO:
            return AUTO
        value = int(text) if text.isdigit() else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"threads must be an integer >= 1 or 'auto', got {value!r}")
    return value


def parse_threads(text: str) -> Threads:
    """`--threads`'s argparse type: `check_threads` with argparse's error."""
    try:
        return check_threads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 1 or 'auto', got {text!r}") from None


def add_threads_arg(parser: argparse.ArgumentParser, *, default: Threads = AUTO,
                    note: str | None = None) -> None:
    """Add `--threads N|auto` to a command (default `default`; `note` follows it in the
    help, e.g. why a command's default is not auto)."""
    tail = f" (default {default}" + (f"; {note})" if note else ")")
    parser.add_argument("--threads", type=parse_threads, default=default, metavar="N|auto",
                        help=THREADS_HELP + tail)


# --------------------------------------------------------------------------- measuring


class CpuSample(NamedTuple):
    """Cumulative CPU counters at one moment."""

    busy: int  # jiffies this process's CPUs spent busy (user, nice, system, irq, softirq, steal)
    total: int  # jiffies they spent in all (busy + idle + iowait)
    own: float  # seconds of CPU this process has used, all its threads


def parse_proc_stat(text: str, cpus: set[int] | None = None) -> tuple[int, int]:
    """(busy, total) jiffies summed over the `cpuN` lines of /proc/stat for N in `cpus`
    (None: every CPU). Guest time is already inside user and nice."""
    busy = total = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        v = [int(f) for f in fields[:8]] + [0] * (8 - len(fields[:8]))
        user, nice, system, idle, iowait, irq, softirq, steal = v
        b = user + nice + system + irq + softirq + steal
        busy += b
        total += b + idle + iowait
    return busy, total


def _cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_sample(path: str = PROC_STAT) -> CpuSample | None:
    """Now's counters for this process's CPUs; None without a readable /proc/stat."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    busy, total = parse_proc_stat(text, _cpus())
    return CpuSample(busy, total, time.process_time())


def others_busy(before: CpuSample, after: CpuSample, cpus: int,
                hz: float | None = None) -> float | None:
    """Cores' worth of CPU other processes used between two samples (None: no time passed).

    busy jiffies / hz − our own CPU seconds, over the interval's length (total jiffies
    / cpus / hz); clamped at 0, since the jiffy counters tick coarser than our clock."""
    hz = hz or os.sysconf("SC_CLK_TCK")
    interval = (after.total - before.total) / cpus / hz
    if interval <= 0:
        return None
    busy = (after.busy - before.busy) / hz
    return max(0.0, busy - (after.own - before.own)) / interval


def threads_for(others: float, cpus: int, cap: int | None = None) -> int:
    """The threads `auto` picks when others use `others` cores of `cpus`: the cores
    left, where a core counts as taken once others use more than `SLACK` of it; at
    least 1, at most `cap`."""
    taken = max(0, math.ceil(others - SLACK))
    return max(1, min(cpus - taken, cap if cap is not None else cpus))


def _cpu_count() -> int:
    cpus = _cpus()
    return len(cpus) if cpus else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- the policy

_TORCH_DEFAULT = torch.get_num_threads()  # OMP_NUM_THREADS, else torch's choice of cores


class AutoThreads:
    """`auto`: torch's threads follow the cores other processes leave free.

    `update()` samples, decides and applies; `tick()` calls it when `EVERY` seconds
    have passed. Call both from the thread that runs torch ops (OpenMP's thread count
    is per thread)."""

    def __init__(self, *, cpus: int | None = None, cap: int | None = None,
                 every: float = EVERY, sample: Callable[[], CpuSample | None] = cpu_sample
                 ) -> None:
        self.cpus = cpus or _cpu_count()  # those this process may run on
        self.cap = min(cap or _TORCH_DEFAULT, self.cpus)
        self.every = every
        self.sample = sample
        self.last = sample()
        self.due = time.monotonic() + every
        self.threads = self.cap
        self.others: float | None = None

    def start(self, first: float = FIRST_SAMPLE) -> int:
        """Choose from a `first`-second sample (we sleep meanwhile) and apply; returns it."""
        if self.last is not None and first > 0:
            time.sleep(first)
        return self.update()

    def decide(self) -> int:
        """Sample and choose (`threads`); nothing is applied."""
        now = self.sample()
        if now is not None and self.last is not None:
            others = others_busy(self.last, now, self.cpus)
            if others is not None:
                self.others = others
                self.threads = threads_for(others, self.cpus, self.cap)
        self.last = now
        self.due = time.monotonic() + self.every
        return self.threads

    def update(self) -> int:
        """`decide`, then apply; returns the count."""
        self.decide()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads


_auto: AutoThreads | None = None


def tick() -> None:
    """Re-evaluate `auto` when it is due (a clock read otherwise); the simulator calls this
    once per round."""
    if _auto is not None and time.monotonic() >= _auto.due:
        _auto.update()


def free_cores(first: float = FIRST_SAMPLE) -> int:
    """What `auto` would choose now, from a `first`-second sample; nothing is applied."""
    policy = AutoThreads()
    if policy.last is not None and first > 0:
        time.sleep(first)
    return policy.decide()


def apply_threads(threads: Threads | None) -> int:
    """Set torch's threads: an int >= 1, or AUTO (chosen now from a 0.1 s sample, then
    re-evaluated by `tick`); None leaves them. Returns the count now in effect."""
    global _auto
    if threads is None:
        return torch.get_num_threads()
    threads = check_threads(threads)
    if threads == AUTO:
        _auto = AutoThreads()
        return _auto.start()
    _auto = None
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def threads_during(threads: Threads | None) -> Iterator[int]:
    """`apply_threads(threads)` inside the block; the previous count (and policy) after."""
    global _auto
    before, policy = torch.get_num_threads(), _auto
    try:
        yield apply_threads(threads)
    finally:
        _auto = policy
        torch.set_num_threads(before)
