"""The random streams of `metagg.seeding`: reproducible, independent, never aliased."""

from __future__ import annotations

import torch

from metagg.seeding import (
    MetaStream,
    RoundStream,
    byzantine_generator,
    derive_generator,
    derive_seed,
    round_generator,
    server_sample_generator,
)


def test_round_generators_are_reproducible_and_independent():
    a = torch.rand(4, generator=round_generator(1, 2, RoundStream.BATCHES))
    assert torch.equal(a, torch.rand(4, generator=round_generator(1, 2, RoundStream.BATCHES)))
    for other in (round_generator(1, 3, RoundStream.BATCHES),
                  round_generator(1, 2, RoundStream.FAILURES),
                  round_generator(2, 2, RoundStream.BATCHES)):
        assert not torch.equal(a, torch.rand(4, generator=other))


def test_streams_are_distinct_values():
    # an IntEnum with two equal values silently makes the second an alias of the first
    for streams in (RoundStream, MetaStream):
        values = [m.value for m in streams.__members__.values()]
        assert len(values) == len(set(values)), streams


def test_derived_seeds_differ_across_streams_and_indices():
    seeds = {derive_seed(0, s, k) for s in MetaStream for k in range(20)}
    assert len(seeds) == 20 * len(MetaStream)
    g1, g2 = (derive_generator(5, MetaStream.PES_NOISE, 3) for _ in range(2))
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


def test_run_level_generators_keep_their_historical_seeds():
    # shipped results (README tables, zoo validation numbers) were drawn with these
    assert torch.equal(torch.rand(3, generator=byzantine_generator(4)),
                       torch.rand(3, generator=torch.Generator().manual_seed(4 + 7919)))
    assert torch.equal(torch.rand(3, generator=server_sample_generator(4)),
                       torch.rand(3, generator=torch.Generator().manual_seed(4 + 104729)))
