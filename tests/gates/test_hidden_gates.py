"""Hidden-state gates: they are built from the tensor the router really sees, and they route prompts home."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.gate_reference import SHRINKAGE
from support.tiny_models import VOCAB, make_base, make_expert, tiny_tokenizer, write_recipe
from transformers import AutoModelForCausalLM

from moemerge import MergeOptions, merge
from moemerge.errors import MoemergeError
from moemerge.gates.hidden import LayerPool, _discriminant
from moemerge.gates.router_inputs import CaptureOptions, RouterInputs, pad_ready, prompt_batches
from moemerge.inputs.sources import ModelSource

PROMPTS = [
    ["aaaa bbbb aaaa", "abab aaaa bbb", "bbba aab abba"],
    ["xxxx yyyy zzzz", "zyx xyz zzzz yy", "yyy xxx zyzyz"],
    ["0101 1010 0", "11 00 1 0 1 01", "1.0, 0.1, 1?"],
]
HELD_OUT = [  # the same three alphabets, in texts the gates never saw
    ["baba abba", "aab bbaa ab", "bbbb aaa"],
    ["zzz xyzy", "yx zz yx", "xzxz yyy zz"],
    ["10 01 1.0", "0, 1, 0?", "111 000 10"],
]


def _router_inputs(base, prompts: list[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """moemerge's capture: every real token's router input [layers, tokens, hidden] and its prompt [tokens]."""
    options = CaptureOptions(torch.device("cpu"), torch.float32, batch_size)
    inputs = RouterInputs(ModelSource(base, "base"), pad_ready(tiny_tokenizer()), prompts, options, max_tokens=256)
    return torch.stack(list(inputs.layers())), inputs.owners


def _pooled(base, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean router input over each prompt's real tokens: [layers, prompts, hidden]."""
    features, owners = _router_inputs(base, prompts, batch_size)
    return torch.stack([features[:, owners == p].mean(dim=1) for p in range(len(prompts))], dim=1)


def _gate_rows(out, layers: int) -> torch.Tensor:
    index = out / "model-00001-of-00001.safetensors"
    with safe_open(str(index), "pt") as handle:
        return torch.stack([handle.get_tensor(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(layers)])


def test_captured_tensor_is_the_router_input(tmp_path):
    """Router inputs recorded inside the merged Mixtral equal what moemerge pools from the dense base."""
    base = make_base(tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yaml", base, [base, base], experts_per_token=1)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = pad_ready(tiny_tokenizer())
    prompts = ["abc def", "zz yy xx ww vv", "q"]

    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, inputs, _o, i=i: seen.__setitem__(i, inputs[0]))
        for i, layer in enumerate(moe.model.layers)
    ]
    for p, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            moe(**ids)
        expected, _ = _router_inputs(base, [prompt])
        for layer, router_input in seen.items():
            tokens = router_input.reshape(ids["input_ids"].shape[1], -1)[1:]  # drop BOS, as the gates do
            torch.testing.assert_close(tokens, expected[layer], atol=1e-5, rtol=1e-5)
        assert len(seen) == len(moe.model.layers), p
    for hook in hooks:
        hook.remove()


def test_padding_does_not_change_router_inputs(tmp_path):
    """A prompt's token router inputs are the same alone or in a padded batch with longer prompts."""
    base = make_base(tmp_path / "base")
    alone, _ = _router_inputs(base, ["ab"])
    batched, owners = _router_inputs(base, ["ab", "a much longer prompt here", "xyz"], batch_size=3)
    assert alone.shape[1] == 2  # two real tokens: BOS and padding are left out
    torch.testing.assert_close(alone, batched[:, owners == 0], atol=1e-5, rtol=1e-5)


def test_held_out_prompts_score_highest_on_their_experts_gate(tmp_path):
    """Texts of each expert\x27s alphabet that were not among its prompts score highest on its gate."""
    base = make_base(tmp_path / "base", num_hidden_layers=4)
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i) for i in range(3)]
    specs = [{"source_model": str(e), "positive_prompts": p} for e, p in zip(experts, PROMPTS, strict=True)]
    recipe = write_recipe(tmp_path / "r.yaml", base, specs, experts_per_token=1)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    rows = _gate_rows(tmp_path / "out", 4)
    pooled = _pooled(base, [p for group in HELD_OUT for p in group])
    labels = torch.tensor([e for e, group in enumerate(HELD_OUT) for _ in group])
    logits = torch.einsum("leh,lph->lpe", rows, pooled)
    correct_per_layer = (logits.argmax(dim=-1) == labels).float().mean(dim=1)
    assert (correct_per_layer >= 2 / 3).sum() >= 3, correct_per_layer


def test_experts_with_near_identical_prompts_are_warned_about(tmp_path, caplog):
    base = make_base(tmp_path / "base")
    specs = [
        {"source_model": str(base), "name": "first", "positive_prompts": ["aaaa bbbb aaaa", "abab abab"]},
        {"source_model": str(base), "name": "twin", "positive_prompts": ["aaaa bbbb aaaa.", "abab abab"]},
        {"source_model": str(base), "name": "other", "positive_prompts": ["zzzz yyyy", "0101 1010"]},
    ]
    with caplog.at_level("WARNING", logger="moemerge"):
        merge(write_recipe(tmp_path / "r.yaml", base, specs), tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records if "nearly parallel" in r.getMessage()]
    assert warned and all("first and twin" in m for m in warned), warned
    assert len({m.split(":")[0] for m in warned}) == 3  # one line per layer, every layer


@pytest.mark.parametrize("tokens", [40, 300], ids=["fewer_tokens_than_hidden", "more_tokens_than_hidden"])
def test_discriminant_is_the_shrunk_covariance_solve(tokens):
    """Σ_shrunk⁻¹ (means − their mean), computed in float64 from its definition, whichever side is factored."""
    hidden, experts = 96, 3
    generator = torch.Generator().manual_seed(tokens)
    labels = torch.arange(tokens) % experts
    # correlated features, as router inputs are: a few directions carry most of the variance
    mixing = torch.randn(hidden, hidden, generator=generator) * torch.logspace(1, -1, hidden)[:, None]
    features = torch.randn(tokens, hidden, generator=generator) @ mixing + labels[:, None] * 0.3
    means = torch.randn(experts, hidden, generator=generator)

    exact = features.double()
    class_means = torch.stack([exact[labels == e].mean(dim=0) for e in range(experts)])
    residual = exact - class_means[labels]
    scatter = residual.T @ residual / tokens
    shrunk = (1 - SHRINKAGE) * scatter + SHRINKAGE * torch.trace(scatter) / hidden * torch.eye(hidden)
    want = torch.linalg.solve(shrunk, (means.double() - means.double().mean(dim=0)).T).T

    got = _discriminant(features, labels, means)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("tokens", [40, 300], ids=["fewer_tokens_than_hidden", "more_tokens_than_hidden"])
def test_layer_pool_fed_batch_by_batch_is_the_whole_layer_solve(tokens):
    """Running sums and a merged scatter, fed in uneven batches, give the rows and norm that the definition
    gives on all tokens at once (float64): Σ_shrunk⁻¹(targetₑ − mean target), targetₑ = mean of expert e's
    positive tokens minus the mean of its negative ones, Σ the positive tokens' within-expert covariance.
    The features share a large offset, as router inputs do, which a naive Σxxᵀ − nμμᵀ in float32 would lose."""
    hidden, experts = 96, 3
    generator = torch.Generator().manual_seed(tokens)
    groups = torch.arange(tokens) % (2 * experts)
    groups = torch.where(groups < experts, groups, experts - 1 - groups)  # −1−e: expert e's negatives
    groups[groups == 1] = -2  # expert 1 has negative prompts only
    groups[groups == -3] = 2  # expert 2 has positive prompts only
    mixing = torch.randn(hidden, hidden, generator=generator) * torch.logspace(1, -1, hidden)[:, None]
    features = torch.randn(tokens, hidden, generator=generator) @ mixing + groups[:, None] * 0.3 + 40.0

    exact, positive = features.double(), groups >= 0
    means = [exact[groups == e].mean(dim=0) if (groups == e).any() else torch.zeros(hidden) for e in range(3)]
    negative_means = [exact[groups == -1 - e].mean(dim=0) if e < 2 else 0 for e in range(3)]
    targets = torch.stack([m - n for m, n in zip(means, negative_means, strict=True)])
    residual = exact[positive] - torch.stack(means)[groups[positive]]
    scatter = residual.T @ residual / len(residual)
    shrunk = (1 - SHRINKAGE) * scatter + SHRINKAGE * torch.trace(scatter) / hidden * torch.eye(hidden)
    want = torch.linalg.solve(shrunk, (targets - targets.mean(dim=0)).T).T

    pool = LayerPool(experts, hidden, int(positive.sum()), torch.device("cpu"))
    sizes = [1, 7, 2, 25, 3]
    sizes.append(tokens - sum(sizes))
    for chunk, chunk_groups in zip(features.split(sizes), groups.split(sizes), strict=True):
        pool.add(chunk, chunk_groups)
    got, norm = pool.rows([["a negative prompt"], ["another"], []])
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    assert norm.item() == pytest.approx(exact.norm(dim=-1).mean().item(), rel=1e-6)


@pytest.mark.parametrize("gate_mode", ["hidden", "trained"])
def test_a_base_tokenizer_with_no_token_to_pad_with(tmp_path, gate_mode):
    """No pad, eos or unk token: the gates are those of the same tokenizer with an eos token to pad with
    (padding is masked, so which id fills it cannot matter), not an error after the other shards. The
    embedding has a row for every token and no more, so a pad id past the vocabulary would fail."""
    base = make_base(tmp_path / "base", vocab_size=len(VOCAB))
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i) for i in range(3)]
    dataset = tmp_path / "d.csv"
    dataset.write_text("prompt,expert\n" + "".join(f'"{p}",{e}\n' for e, group in enumerate(PROMPTS) for p in group))
    specs = [{"source_model": str(e), "positive_prompts": p} for e, p in zip(experts, PROMPTS, strict=True)]
    fields = {"dataset_csv": str(dataset), "training": {"steps": 20, "holdout": 0}} if gate_mode == "trained" else {}
    rows = {}
    for name, tokenizer in [("eos", tiny_tokenizer()), ("none", tiny_tokenizer(eos_and_unk=False))]:
        for file in base.glob("*token*"):
            file.unlink()
        tokenizer.save_pretrained(base)
        recipe = write_recipe(tmp_path / f"{name}.yaml", base, specs, gate_mode=gate_mode, **fields)
        merge(recipe, tmp_path / name, MergeOptions(device="cpu", batch_size=3))
        rows[name] = _gate_rows(tmp_path / name, 3)
    assert tiny_tokenizer(eos_and_unk=False).pad_token is None
    torch.testing.assert_close(rows["none"], rows["eos"], atol=1e-5, rtol=1e-5)


def test_padding_ids_are_rows_of_the_embedding():
    """The pad token made for a tokenizer without one has an id past the vocabulary; the ids fed to the base
    are all rows it has (the layer stream reads a row's bytes at its offset, and past the end is another tensor)."""
    batches = prompt_batches(pad_ready(tiny_tokenizer(eos_and_unk=False)), ["ab", "abcdef", "a"], 3, None)
    assert batches[0].attention_mask.min() == 0  # padded
    assert max(int(b.input_ids.max()) for b in batches) < len(VOCAB)


def test_hidden_states_that_overflow_float32_are_refused_naming_the_layer(tmp_path):
    """Finite weights (layer 1's down_proj scaled to ~1e37) whose output is beyond float32: one line that
    says where, not a failed Cholesky factorisation, and no output."""
    base = make_base(tmp_path / "base")
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.down_proj.weight"] *= 1e38
    assert all(torch.isfinite(t).all() for t in tensors.values())
    save_file(tensors, str(weights), metadata={"format": "pt"})
    specs = [{"source_model": str(base), "positive_prompts": group} for group in PROMPTS]
    recipe = write_recipe(tmp_path / "r.yaml", base, specs)
    with pytest.raises(MoemergeError, match=r"layer 2 are not finite: the base's hidden states overflow float32") as e:
        merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "r.yaml"]
