"""The layer-streamed router inputs equal the whole transformers model's, on every input family."""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import resource
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from support.gate_reference import SHRINKAGE
from support.tiny_models import make_base, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge import MergeOptions, merge
from moemerge.errors import MoemergeError
from moemerge.gates import trained
from moemerge.gates.activations import Activations
from moemerge.gates.modes.mode import capture_dtype
from moemerge.gates.router_inputs import CaptureOptions, RouterInputs, pad_ready, prompt_batches
from moemerge.gates.trained import fit_gates, prompts_within_budget, sample_tokens
from moemerge.inputs.recipe import TrainingSpec
from moemerge.inputs.sources import ModelSource

# Llama 3.1's rope scaling, with an original context shorter than the prompts below.
LLAMA3 = dict(
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    rope_theta=500000.0,
)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3": ("llama", LLAMA3),
    "mistral": ("mistral", dict(sliding_window=4)),  # shorter than most prompts
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": ("qwen3", {}),  # q/k norms
}
PROMPTS = [
    "a quick brown fox jumps over the lazy dog",
    "",  # BOS only: the one token kept
    "zz yy",
    "hello, world. is this long enough? 0101",
    "q",
    "the sliding window is shorter than this",
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request, tmp_path_factory) -> Path:
    family, overrides = FAMILIES[request.param]
    return make_base(tmp_path_factory.mktemp(request.param) / "base", family, seed=3, **overrides)


def whole_model_router_inputs(base: Path, prompt: str) -> torch.Tensor:
    """One prompt alone (no padding) through the whole transformers model, with forward hooks on every
    post_attention_layernorm: [layers, tokens, hidden] over its tokens other than BOS (all, if BOS is all)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)  # as the folder has it (Qwen2's class drops spaces)
    seen: list[torch.Tensor] = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
        for layer in model.model.layers
    ]
    encoded = tokenizer(prompt, return_tensors="pt", return_special_tokens_mask=True)
    with torch.no_grad():
        model(input_ids=encoded["input_ids"])
    for hook in hooks:
        hook.remove()
    real = ~encoded["special_tokens_mask"][0].bool()
    real = real if real.any() else ~real
    return torch.stack([hidden[real] for hidden in seen])


def merged_gates(out: Path, layers: int) -> torch.Tensor:
    """The router weights a merge wrote, [layers, experts, hidden], whichever MoE format it chose."""
    rows = {}
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            if name.endswith((".gate.weight",)) and ".experts." not in name and "shared" not in name:
                rows[int(name.split(".")[2])] = handle.get_tensor(name)
    return torch.stack([rows[layer] for layer in range(layers)])


def tokenizer_of(base: Path):
    return pad_ready(AutoTokenizer.from_pretrained(base))


def streamed(base: Path, prompts: list[str], batch_size: int = 3, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    options = CaptureOptions(torch.device("cpu"), torch.float32, batch_size, **kwargs)
    inputs = RouterInputs(ModelSource(base, "base"), tokenizer_of(base), prompts, options, max_tokens=None)
    return list(inputs.layers()), inputs.owners


def test_streamed_router_inputs_equal_the_whole_model(base):
    """Padded batches of mixed lengths, layer by layer, against each prompt alone through the whole model."""
    layers, owners = streamed(base, PROMPTS)
    assert len(layers) == 3
    for p, prompt in enumerate(PROMPTS):
        expected = whole_model_router_inputs(base, prompt)
        got = torch.stack([features[owners == p] for features in layers])
        assert got.shape == expected.shape, prompt
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_batches_keep_within_the_padded_token_cap(base):
    """Every prompt lands in exactly one batch, and a batch holds at most batch_size prompts and, unless it is a
    single prompt, at most batch_tokens padded tokens."""
    prompts = ["a" * n for n in (1, 2, 3, 5, 8, 13, 21, 34, 3, 2, 1, 40)]
    batches = prompt_batches(tokenizer_of(base), prompts, batch_size=4, max_tokens=None, batch_tokens=30)
    assert sorted(i for b in batches for i in b.prompts) == list(range(len(prompts)))
    assert all(len(b.prompts) <= 4 for b in batches)
    assert all(b.input_ids.numel() <= 30 or len(b.prompts) == 1 for b in batches)
    for batch, after in itertools.pairwise(batches):  # greedy: the next prompt would have broken a limit
        longest = after.attention_mask[0].sum().item()  # shortest of the next batch, longer than all in this one
        assert batch.attention_mask.sum(dim=1).max() <= longest
        assert len(batch.prompts) == 4 or (len(batch.prompts) + 1) * longest > 30
    widest = prompt_batches(tokenizer_of(base), prompts, batch_size=100, max_tokens=None, batch_tokens=10_000)
    assert len(widest) == 1


def test_activations_on_disk_give_the_same_router_inputs(base):
    """A zero activation budget sends the hidden states between layers through a temporary file."""
    in_memory, owners = streamed(base, PROMPTS, batch_size=2)
    on_disk, disk_owners = streamed(base, PROMPTS, batch_size=2, activation_budget=0)
    assert torch.equal(owners, disk_owners)
    for memory_layer, disk_layer in zip(in_memory, on_disk, strict=True):
        assert torch.equal(memory_layer, disk_layer)


def test_activations_budget_bounds_all_batches_together():
    """The hidden states of every batch are held between two layers, so the budget bounds their sum: four
    batches of 128 bytes, each within a 300-byte budget alone, go to a temporary file together; within a
    512-byte budget they stay in memory. Either way each batch reads back as written."""
    shapes = [(1, 4, 8)] * 4  # 32 float32 values: 128 bytes each
    batches = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    for budget, on_disk in [(300, True), (512, False)]:
        with Activations(shapes, torch.float32, torch.device("cpu"), budget=budget) as held:
            assert held.on_disk == on_disk, budget
            for i, batch in enumerate(batches):
                held[i] = batch
            for i, batch in enumerate(batches):
                assert torch.equal(held[i], batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_capture_dtype_on_cpu_is_bfloat16_only_with_native_bf16(dtype):
    """On CPU the base runs in bfloat16 only when the output is bfloat16 and the CPU computes it natively (AVX512
    BF16), else in float32 (float16 on CPU too); on CUDA in the output dtype."""
    native = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    want = torch.bfloat16 if dtype == torch.bfloat16 and native else torch.float32
    assert capture_dtype(torch.device("cpu"), dtype) == want
    assert capture_dtype(torch.device("cuda"), dtype) == dtype


def test_kept_tokens_and_layer_count(base):
    """`keep` selects tokens of the full capture; `count` stops the stream early."""
    full, owners = streamed(base, PROMPTS)
    keep = torch.arange(len(owners)) % 3 == 1
    options = CaptureOptions(torch.device("cpu"), torch.float32, 3)
    inputs = RouterInputs(ModelSource(base, "base"), tokenizer_of(base), PROMPTS, options, max_tokens=None)
    partial = list(inputs.layers(count=2, keep=keep))
    assert len(partial) == 2
    for layer in range(2):
        assert torch.equal(partial[layer], full[layer][keep])


def test_hidden_gate_merge_is_built_from_the_whole_model_router_inputs(base, tmp_path):
    """The merged routers equal the hidden-gate definition evaluated in float64 on the whole transformers
    model's router inputs: rows ∝ Σ_shrunk⁻¹(μₑ − μ̄), centred over experts, unit length, times
    gate_scale / mean token norm (the definition in moemerge.gates.hidden and rows, written out here)."""
    texts = [p for p in PROMPTS if p]  # recipes drop blank prompts
    groups = [texts[:2], texts[2:4], texts[4:]]
    specs = [{"source_model": str(base), "positive_prompts": group} for group in groups]
    recipe = write_recipe(tmp_path / "r.yaml", base, specs, gate_scale=7.0)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu", batch_size=2))
    got = merged_gates(tmp_path / "out", 3)
    per_prompt = [whole_model_router_inputs(base, p).double() for group in groups for p in group]
    labels = [e for e, group in enumerate(groups) for _ in group]
    token_labels = torch.cat([torch.full((f.shape[1],), labels[i]) for i, f in enumerate(per_prompt)])
    features = torch.cat(per_prompt, dim=1)  # [layers, tokens, hidden]
    for layer in range(3):
        x = features[layer]
        means = torch.stack([x[token_labels == e].mean(dim=0) for e in range(3)])
        residual = x - means[token_labels]
        scatter = residual.T @ residual / len(x)
        hidden = x.shape[1]
        shrunk = (1 - SHRINKAGE) * scatter + SHRINKAGE * torch.trace(scatter) / hidden * torch.eye(hidden).double()
        rows = torch.linalg.solve(shrunk, (means - means.mean(dim=0)).T).T
        rows = rows - rows.mean(dim=0)
        rows = rows / rows.norm(dim=-1, keepdim=True) * 7.0 / x.norm(dim=-1).mean()
        torch.testing.assert_close(got[layer].double(), rows, rtol=1e-4, atol=1e-4 * rows.abs().max().item())


def test_fitting_layer_by_layer_equals_fitting_all_layers_at_once():
    """Trained gates fit each layer as it is captured; the joint fit over layers gives the same weights."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    features = torch.randn(2, 300, 16, generator=generator) + labels[None, :, None] * 0.2
    spec = TrainingSpec(steps=40, lr=0.05)
    joint = fit_gates(features, labels, 3, spec)
    alone = torch.cat([fit_gates(features[layer : layer + 1], labels, 3, spec) for layer in range(2)])
    torch.testing.assert_close(alone, joint, rtol=1e-5, atol=1e-6)


def test_token_budget_keeps_each_experts_share():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    candidates = torch.ones(1000, dtype=torch.bool)
    candidates[::10] = False  # 900 candidates: 540 / 270 / 90
    assert torch.equal(sample_tokens(candidates, labels, 900, seed=0), candidates)
    chosen = sample_tokens(candidates, labels, 90, seed=0)
    assert not (chosen & ~candidates).any()
    assert [int((chosen & (labels == e)).sum()) for e in range(3)] == [54, 27, 9]
    assert not torch.equal(chosen, sample_tokens(candidates, labels, 90, seed=1))


def test_prompts_within_budget_fill_each_experts_share():
    counts = [10, 20, 30, 40] * 25 + [5] * 50  # expert 0: the first 100 prompts, 2500 tokens; expert 1: 250
    labels = [0] * 100 + [1] * 50
    assert prompts_within_budget(counts, labels, 2750, seed=0) == list(range(150))
    chosen = prompts_within_budget(counts, labels, 550, seed=0)
    by_expert = [[i for i in chosen if labels[i] == e] for e in range(2)]
    used = [sum(counts[i] for i in group) for group in by_expert]
    assert 500 - 40 < used[0] <= 500 and 50 - 5 < used[1] <= 50  # shares 550 * 2500 / 2750 and 550 * 250 / 2750
    assert chosen == sorted(set(chosen)) and prompts_within_budget(counts, labels, 550, seed=1) != chosen
    few = prompts_within_budget(counts, labels, 11, seed=0)  # shares of 10 and 1 tokens: two prompts each still
    assert [sum(labels[i] == e for i in few) for e in range(2)] == [2, 2]


def labelled_recipe(tmp_path, base, rows: list[tuple[str, int]], experts: int, training: dict):
    """A trained-gate recipe over `rows` (text, expert) written as train.csv; every expert is the base."""
    (tmp_path / "train.csv").write_text("prompt,expert\n" + "".join(f'"{t}",{e}\n' for t, e in rows))
    return write_recipe(
        tmp_path / "r.yaml",
        base,
        [{"source_model": str(base), "name": f"e{i}"} for i in range(experts)],
        gate_mode="trained",
        dataset_csv=str(tmp_path / "train.csv"),
        training=training,
    )


def test_trained_gates_on_a_token_budget_still_route(tmp_path, monkeypatch):
    """With room for a fifth of the labelled tokens, the gates are fitted on that sample and still route
    held-out prompts home."""
    base = make_base(tmp_path / "base", "qwen3", num_hidden_layers=2)
    alphabets = ["abcdefg", "stuvwxyz", "01.,?"]
    rows = [
        ("".join(alphabets[e][(i * 7 + j * 3) % len(alphabets[e])] for j in range(12 + i % 7)), e)
        for e in range(3)
        for i in range(30)
    ]
    recipe = labelled_recipe(tmp_path, base, rows, 3, {"steps": 150, "lr": 0.05})
    tokens = sum(len(t) for t, _ in rows)
    monkeypatch.setattr(trained, "FEATURE_BUDGET", 4 * 32 * tokens // 5)  # float32, hidden 32
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    report = json.loads((tmp_path / "out" / "gate_training.json").read_text())
    assert report["train_tokens"] + report["holdout_tokens"] <= tokens // 5
    assert report["train_tokens"] >= tokens // 5 * 0.75
    assert report["labelled_prompts"] == 90 and report["train_prompts"] + report["holdout_prompts"] < 30
    assert "of a sample drawn from 90 labelled prompts" in (tmp_path / "out" / "README.md").read_text()
    assert min(report["layer_accuracy"]) >= 0.9, report


def test_a_sampled_labelled_set_leaves_every_expert_prompts_to_train_on(tmp_path, monkeypatch):
    """The holdout check passes on the whole labelled set; the sample must pass it too. An expert whose share
    of the budget is two short prompts loses both to holdout 0.75 (round(1.5) = 2) and was fitted to lose."""
    from moemerge.gates.modes import trained as trained_mode
    from moemerge.inputs.prompts import split_prompts

    base = make_base(tmp_path / "base", num_hidden_layers=2)
    rows = [("abcdefg" * 14, 0)] * 50 + [("xyz", 1)] * 10
    recipe = labelled_recipe(tmp_path, base, rows, 2, {"steps": 5, "holdout": 0.75})
    monkeypatch.setattr(trained, "FEATURE_BUDGET", 4 * 32 * 600)  # about 6 of expert 0's prompts, 2 of expert 1's
    fitted = []

    def train_gates(inputs, labels, num_experts, spec, *args, **kwargs):
        fitted.append({labels[i] for i in split_prompts(labels, spec.holdout, spec.seed)[0]})
        return trained.train_gates(inputs, labels, num_experts, spec, *args, **kwargs)

    monkeypatch.setattr(trained_mode, "train_gates", train_gates)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert json.loads((tmp_path / "out" / "gate_training.json").read_text())["labelled_prompts"] == 60
    assert fitted == [{0, 1}], "an expert of the sample has no prompt left to train on"


def test_layers_left_to_hidden_gates_see_only_the_sampled_rows(tmp_path, monkeypatch):
    """With training.layers a subset, the other layers get hidden gates from each expert's positive prompts,
    which the dataset's rows join; over the budget, only the rows sampled for training go through the base."""
    from moemerge.gates.modes import hidden as hidden_mode

    base = make_base(tmp_path / "base", num_hidden_layers=2)
    rows = [(f"{'abcdefg'[i % 7]}" * (8 + i % 5), i % 2) for i in range(60)]
    recipe = labelled_recipe(tmp_path, base, rows, 2, {"steps": 5, "layers": [0]})
    own = [expert["positive_prompts"] for expert in yaml.safe_load(recipe.read_text())["experts"]]
    monkeypatch.setattr(trained, "FEATURE_BUDGET", 4 * 32 * 200)  # about a fifth of the rows' tokens
    seen = []

    def hidden_prototypes(base, tokenizer, positive, *args, **kwargs):
        seen.append(positive)
        return real(base, tokenizer, positive, *args, **kwargs)

    real = hidden_mode.hidden_prototypes
    monkeypatch.setattr(hidden_mode, "hidden_prototypes", hidden_prototypes)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    report = json.loads((tmp_path / "out" / "gate_training.json").read_text())
    sampled = report["train_prompts"] + report["holdout_prompts"]
    assert sampled < 30, report
    [positive] = seen
    assert [group[:1] for group in positive] == own, "each expert's own prompt is kept"
    assert sum(len(group) - 1 for group in positive) == sampled
    assert all((text, e) in rows for e, group in enumerate(positive) for text in group[1:])


def test_a_spill_file_over_the_file_size_limit_names_tmpdir_before_the_first_layer(tmp_path, monkeypatch):
    """Over `ulimit -f` (or with no room in TMPDIR) the spill is refused when it is made, naming TMPDIR, not as
    a write error of some later batch (which the merge would report against its output)."""
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))  # Python ignores SIGXFSZ: writes get EFBIG
    try:
        with pytest.raises(MoemergeError) as error:
            Activations([(4, 256, 512)] * 2, torch.float32, torch.device("cpu"), budget=0)  # 4 MiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(error.value)
    assert f"in a temporary file in {spill} (TMPDIR)" in message and "set TMPDIR to a folder with room" in message
    assert "\n" not in message and list(spill.iterdir()) == []


def test_a_full_tmpdir_stops_the_merge_with_one_line(tmp_path, monkeypatch):
    """The gate pass refuses the spill while the shards are being written: the merge ends with that error and
    leaves nothing behind."""
    base = make_base(tmp_path / "base")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        base,
        [
            {"source_model": str(base), "positive_prompts": ["ab"]},
            {"source_model": str(base), "positive_prompts": ["xy"]},
        ],
    )

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(
        "moemerge.gates.modes.mode.CaptureOptions", functools.partial(CaptureOptions, activation_budget=0)
    )
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(MoemergeError, match=r"\(TMPDIR\), which cannot hold it: No space left on device"):
        merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "r.yaml"]
