"""The engine's sampling follows OpenAI's (and transformers') semantics: top_k keeps the k most likely tokens,
top_p then keeps the smallest set of those whose renormalised probability reaches top_p, and the draw follows
the renormalised probabilities of what is left. Checked on a fixed distribution over five tokens by drawing
many times from the seeded generator the engine uses."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from moemerge.tools.engine import SamplingParams, _sample

PROBABILITIES = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
DRAWS = 3000


def _frequencies(params: SamplingParams) -> dict[int, float]:
    generator = torch.Generator().manual_seed(0)
    counts = Counter(_sample(PROBABILITIES.log(), params, generator) for _ in range(DRAWS))
    return {token: count / DRAWS for token, count in sorted(counts.items())}


def _kept(probabilities: list[float]) -> dict[int, float]:
    total = sum(probabilities)
    return {token: p / total for token, p in enumerate(probabilities)}


@pytest.mark.parametrize(
    ("top_k", "top_p", "want"),
    [
        (2, 1.0, _kept([0.5, 0.2])),  # exactly k candidates
        (3, 1.0, _kept([0.5, 0.2, 0.15])),
        # top-3 renormalised: 0.59, 0.24, 0.18; the smallest prefix reaching 0.6 is the first two
        (3, 0.6, _kept([0.5, 0.2])),
        (0, 0.6, _kept([0.5, 0.2])),  # no top_k: 0.5 < 0.6 ≤ 0.7
        (4, 0.5, {0: 1.0}),  # the first token alone has 0.53 ≥ 0.5 after top-4
    ],
)
def test_top_k_then_top_p_keep_what_openai_keeps(top_k, top_p, want):
    got = _frequencies(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
    assert set(got) == set(want), got
    for token, share in want.items():
        assert got[token] == pytest.approx(share, abs=0.04), (token, got)
