import statistics

import pytest
import torch

from metagg.attacks import ATTACKS, make_attack


@pytest.fixture
def honest():
    return torch.randn(10, 50, generator=torch.Generator().manual_seed(0))


BYZ = torch.tensor([0, 1, 2])


def forge(name, honest, **kw):
    return make_attack(name, **kw).forge(honest, BYZ, None, torch.Generator().manual_seed(1))


def test_sign_flip(honest):
    torch.testing.assert_close(forge("sign_flip", honest, scale=2.0), -2.0 * honest[:3])


def test_gaussian_scale(honest):
    out = forge("gaussian", honest, sigma=200.0)
    assert out.shape == (3, 50)
    assert 150 < out.std() < 250


def test_zero(honest):
    assert torch.equal(forge("zero", honest), torch.zeros(3, 50))


def test_alie_fixed_z(honest):
    good = honest[3:]
    want = good.mean(0) - 1.5 * good.std(0, unbiased=False)
    out = forge("alie", honest)
    for row in out:
        torch.testing.assert_close(row, want)


def test_alie_auto_z():
    a = make_attack("alie", z="auto")
    # n = 10, b = 3: s = 6 - 3 = 3, z = Φ⁻¹(7/10)
    assert a.z_value(10, 3) == pytest.approx(statistics.NormalDist().inv_cdf(0.7))
    assert a.z_value(10, 7) == 1.5  # undefined at a Byzantine majority: fixed fallback


def test_ipm(honest):
    out = forge("ipm", honest, eps=100.0)
    torch.testing.assert_close(out[1], -100.0 * honest[3:].mean(0))


def test_mimic_copies_an_honest_worker(honest):
    out = forge("mimic", honest)
    assert all(torch.equal(r, honest[3]) for r in out)


def test_flags():
    assert make_attack("crash").drops_workers
    assert make_attack("label_flip").flips_labels
    assert not make_attack("alie").drops_workers


def test_unknown_and_bad_options():
    with pytest.raises(ValueError, match="unknown attack 'evil'; allowed: none"):
        make_attack("evil")
    with pytest.raises(ValueError, match="bad options"):
        make_attack("ipm", epsilon=3)
    with pytest.raises(ValueError, match="z must be"):
        make_attack("alie", z="big")
    assert "sign_flip" in ATTACKS
