"""Worker momentum (Karimireddy et al. 2021): honest workers send an EMA of their updates."""

import pytest
import torch

from metagg.aggregators.rules import server_update
from metagg.config import ConfigError, config_from_dict
from metagg.simulation import Simulation

pytestmark = pytest.mark.usefixtures("one_thread")


def make(digits, beta=0.5, **extra):
    cfg = {"rounds": 10, "eval_every": 10, "workers": {"num_workers": 4, "batch_size": 16,
                                                        "momentum": beta}}
    cfg.update(extra)
    return Simulation(config_from_dict(cfg), dataset=digits)


def test_sent_rows_are_the_ema_of_each_workers_updates(digits):
    sim = make(digits, beta=0.75)  # mean + SGD(lr 1): θ moves by the mean of what is sent
    want = None
    for _ in range(4):
        honest = sim.cluster.compute(sim.params, sim.round).updates
        want = honest.clone() if want is None else 0.75 * want + 0.25 * honest
        before = sim.params.clone()
        sim.step()
        torch.testing.assert_close(sim.worker_momentum, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(before - sim.params, want.mean(0), rtol=1e-5, atol=1e-7)


def test_missing_and_nonfinite_rows_leave_their_buffer_alone(digits):
    sim = make(digits)
    d = sim.task.layout.size
    everyone, losses = torch.ones(4, dtype=torch.bool), torch.zeros(4)
    sim.server.step(torch.ones(4, d), torch.tensor([True, True, True, False]), losses)
    assert sim.momentum_started.tolist() == [True, True, True, False]
    third = torch.full((4, d), 3.0)
    third[0, 5] = float("nan")
    sim.server.step(third, torch.tensor([True, False, True, True]), losses)
    m = sim.worker_momentum
    assert torch.equal(m[0], torch.ones(d))  # NaN row: dropped, buffer kept
    assert torch.equal(m[1], torch.ones(d))  # missing: buffer kept
    assert torch.equal(m[2], torch.full((d,), 2.0))  # 0.5 * 1 + 0.5 * 3
    assert torch.equal(m[3], torch.full((d,), 3.0))  # first arrival starts the buffer
    assert sim.dropped_updates == 1 and sim.missing_updates == 2
    assert torch.isfinite(sim.params).all() and sim.momentum_started.all()
    sim.server.step(torch.zeros(4, d), everyone, losses)  # the in-place path
    assert torch.equal(sim.worker_momentum[2], torch.ones(d))


def test_an_absent_worker_shows_the_attacker_its_momentum_not_its_raw_update(digits):
    sim = make(digits)
    d = sim.task.layout.size
    sim.server.step(torch.ones(4, d), torch.ones(4, dtype=torch.bool), torch.zeros(4))
    sent = sim.server._worker_momentum(torch.full((4, d), 3.0),
                                       torch.tensor([True, False, True, True]))
    assert torch.equal(sent, torch.full((4, d), 2.0))  # what each would send
    assert torch.equal(sim.worker_momentum[1], torch.ones(d))  # but 1's buffer stays
    # the general path (someone absent) and the in-place one agree bit for bit
    gen = torch.Generator().manual_seed(0)
    a, b = make(digits, beta=0.9), make(digits, beta=0.9)
    first, second = torch.randn(2, 4, d, generator=gen)
    for sim in (a, b):
        sim.server._worker_momentum(first, torch.ones(4, dtype=torch.bool))
    fast = a.server._worker_momentum(second, torch.ones(4, dtype=torch.bool))
    general = b.server._worker_momentum(second, torch.tensor([True, True, True, False]))
    assert torch.equal(fast[:3], general[:3])


def test_byzantine_workers_forge_from_honest_momenta(digits):
    sim = make(digits, attack={"name": "sign_flip", "num_byzantine": 1})
    d, everyone, losses = sim.task.layout.size, torch.ones(4, dtype=torch.bool), torch.zeros(4)
    sim.server.step(torch.ones(4, d), everyone, losses)
    before = sim.params.clone()
    sim.server.step(torch.full((4, d), 3.0), everyone, losses)
    # momenta are 2; worker 0 sends -2; the mean of (-2, 2, 2, 2) is 1
    torch.testing.assert_close(before - sim.params, torch.ones(d))


def test_fltrust_compares_momenta_with_its_own_momentum(digits):
    sim = make(digits, aggregator="fltrust")
    refs, want = [], None
    for _ in range(3):
        g0 = server_update(sim.context(torch.arange(4)))
        want = g0 if want is None else want + 0.5 * (g0 - want)
        refs.append(want)
        sim.step()
        torch.testing.assert_close(sim.agg_state.rule.reference, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(refs[0], refs[-1])


def test_momentum_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"workers\.momentum: must be in \[0, 1\)"):
        config_from_dict({"workers": {"momentum": 1.0}})
