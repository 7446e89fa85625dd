"""Timestep respacing keeps exactly the steps improved-diffusion/ADM/DiT keep, for every count."""
from __future__ import annotations

import itertools

import pytest

from diffusion.respace import space_timesteps


def _running_position(num_timesteps: int, counts: list) -> set:
    """iDDPM's rule, written independently: equal sections (the first `T % len(counts)` one step longer);
    in each, the rounded prefix sums 0, s, s+s, ... of the float stride s = (size-1)/(count-1)."""
    sizes = [num_timesteps // len(counts) + (i < num_timesteps % len(counts)) for i in range(len(counts))]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    kept = set()
    for start, size, count in zip(starts, sizes, counts):
        stride = (size - 1) / (count - 1) if count > 1 else 1
        positions = itertools.accumulate(itertools.repeat(stride, count - 1), initial=0.0)
        kept |= {start + round(p) for p in positions}
    return kept


def test_reference_facts():
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    assert 499 in space_timesteps(1000, "23")
    assert 500 in space_timesteps(1000, "31") and 499 not in space_timesteps(1000, "31")


def test_every_count_matches_the_running_position_rule():
    for n in range(1, 1001):
        kept = space_timesteps(1000, str(n))
        assert kept == _running_position(1000, [n]), n
        assert len(kept) == n and min(kept) == 0 and (n == 1 or max(kept) == 999)


@pytest.mark.parametrize("T,spec", [(1000, "10,15,20"), (300, "10,15,20"), (1000, "7,21,31"),
                                    (1001, "21,23"), (999, "250,1,100,33")])
def test_multi_section_specs(T, spec):
    assert space_timesteps(T, spec) == _running_position(T, [int(c) for c in spec.split(",")])
