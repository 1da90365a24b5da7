"""Every gate mode's router rows against the README's definition, computed independently of moemerge: a zeroed
prototype, an ignored gate_scale, a flipped sign or a wrong distribution fails here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support.gate_reference import assert_rows_close, gate_rows, hidden_rows, unit_rows
from support.tiny_models import make_base, read_tensors, write_recipe
from transformers import AutoTokenizer

from moemerge import MergeOptions, merge

GATE_SCALE = 7.0  # not the default (30), so a gate_scale that is ignored shows
# Three experts; an expert's prompts differ in token count (a mean over tokens is not a mean of prompt means).
POSITIVE = [
    ["aaaa bbbb aaaa", "ab", "bbba aab abbaa"],
    ["xxxx yyyy zzzz zzzz yyyy", "zyx", "yyy xxx zyzyzz"],
    ["0101 1010 0, 1", "11", "1.0, 0.1, 1? 0 0 0 0 0 0 0 0"],
]
NEGATIVE = [["zzzz yyyy", "0101 1010"], [], ["aaaa bbbb", "xxxx abab"]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("gates") / "base", num_hidden_layers=3)


def _merge(folder: Path, base: Path, gate_mode: str, seed: int = 0, **fields) -> Path:
    specs = [
        {"source_model": str(base), "positive_prompts": p, "negative_prompts": n}
        for p, n in zip(POSITIVE, NEGATIVE, strict=True)
    ]
    recipe = write_recipe(folder / f"{gate_mode}.yaml", base, specs, gate_mode=gate_mode, **fields)
    out = folder / f"{gate_mode}-{seed}-{fields.get('gate_scale')}"
    merge(recipe, out, MergeOptions(device="cpu", seed=seed))
    return out


def test_hidden_rows(base, tmp_path):
    got = gate_rows(_merge(tmp_path, base, "hidden", gate_scale=GATE_SCALE))
    want = hidden_rows(base, POSITIVE, NEGATIVE, GATE_SCALE)
    assert_rows_close(got, want)
    # The negative prompts really weigh in: without them the rows are far from these.
    without = hidden_rows(base, POSITIVE, [[], [], []], GATE_SCALE)
    assert (without - want).abs().max() > 0.1 * want.abs().max()


def test_cheap_embed_rows(base, tmp_path):
    """Mean input embedding of the positive prompts' tokens minus the negative ones', the same row in every layer,
    centred, unit length, times gate_scale over the norm of the layer's post-attention norm weight. The mean is of
    per-prompt means (each prompt's tokens averaged, then the prompts): with prompts of unequal length, the mean
    over all their tokens gives other rows, which this test tells apart."""
    got = gate_rows(_merge(tmp_path, base, "cheap_embed", gate_scale=GATE_SCALE))
    tensors = read_tensors(base)
    embed = tensors["model.embed_tokens.weight"].double()
    tokenizer = AutoTokenizer.from_pretrained(base)

    def prompt_means(prompts: list[str]) -> torch.Tensor:
        return torch.stack([embed[tokenizer(p, add_special_tokens=False)["input_ids"]].mean(dim=0) for p in prompts])

    def token_mean(prompts: list[str]) -> torch.Tensor:
        return embed[[i for p in prompts for i in tokenizer(p, add_special_tokens=False)["input_ids"]]].mean(dim=0)

    layers = got.shape[0]
    norms = torch.stack(
        [tensors[f"model.layers.{i}.post_attention_layernorm.weight"].double().norm() for i in range(layers)]
    )

    def rows_of(mean) -> torch.Tensor:
        rows = torch.stack([mean(p) - (mean(n) if n else 0) for p, n in zip(POSITIVE, NEGATIVE, strict=True)])
        return unit_rows(rows.expand(layers, -1, -1), norms, GATE_SCALE)

    want = rows_of(lambda prompts: prompt_means(prompts).mean(dim=0))
    assert_rows_close(got, want, rel=1e-6)
    pooled = rows_of(token_mean)  # the other averaging, far enough off to fail the check above
    assert (pooled - want).abs().max() > 1e-2 * want.abs().max()


def _ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and `cdf`."""
    x = samples.double().reshape(-1).sort().values
    n = len(x)
    f = cdf(x)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((steps - f).max().item(), (f - (steps - 1 / n)).max().item())


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Hidden 512 and 8 experts: 2 × 8 × 512 = 8192 draws per merge, enough for a sharp distribution test."""
    return make_base(
        tmp_path_factory.mktemp("wide") / "base", hidden_size=512, intermediate_size=16, num_hidden_layers=2
    )


def _random_merge(folder: Path, base: Path, mode: str, seed: int, gate_scale: float) -> torch.Tensor:
    recipe = write_recipe(folder / "r.yaml", base, [base] * 8, gate_mode=mode, gate_scale=gate_scale)
    out = folder / f"{mode}-{seed}-{gate_scale}"
    merge(recipe, out, MergeOptions(device="cpu", seed=seed))
    return gate_rows(out)


# KS distance allowed for 8192 draws: the 0.1% critical value, 1.95 / sqrt(n).
KS_LIMIT = 1.95 / math.sqrt(8192)


def test_random_rows_are_standard_normal(wide, tmp_path):
    rows = _random_merge(tmp_path, wide, "random", seed=1, gate_scale=GATE_SCALE)
    assert rows.shape == (2, 8, 512)
    x = rows.double().reshape(-1)
    assert abs(x.mean().item()) < 4 / math.sqrt(len(x))  # the mean's standard error is 1/sqrt(n)
    assert abs(x.std().item() - 1) < 4 / math.sqrt(2 * len(x))
    normal_cdf = lambda v: 0.5 * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    assert _ks_statistic(x, normal_cdf) < KS_LIMIT
    # Every layer and expert is a draw of its own; the seed picks the draw; gate_scale plays no part.
    flat = rows.reshape(16, 512)
    assert (torch.corrcoef(flat) - torch.eye(16)).abs().max() < 0.2
    assert torch.equal(_random_merge(tmp_path, wide, "random", seed=1, gate_scale=30.0), rows)
    assert not torch.equal(_random_merge(tmp_path, wide, "random", seed=2, gate_scale=GATE_SCALE), rows)


def test_uniform_random_rows_are_uniform_in_plus_minus_one_over_root_hidden(wide, tmp_path):
    rows = _random_merge(tmp_path, wide, "uniform_random", seed=1, gate_scale=GATE_SCALE)
    bound = 1 / math.sqrt(512)
    x = rows.double().reshape(-1)
    assert x.abs().max().item() <= bound
    assert x.max().item() > 0.99 * bound and x.min().item() < -0.99 * bound  # the whole range is used
    assert _ks_statistic(x, lambda v: ((v + bound) / (2 * bound)).clamp(0, 1)) < KS_LIMIT
    assert torch.equal(_random_merge(tmp_path, wide, "uniform_random", seed=1, gate_scale=30.0), rows)
    assert not torch.equal(_random_merge(tmp_path, wide, "uniform_random", seed=2, gate_scale=GATE_SCALE), rows)
