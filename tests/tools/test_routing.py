"""Texts routed together (`routing.route_texts`, what `report`, `route` and `eval` run: batches padded on the
right with an attention mask) get the router logits and next-token losses transformers computes for each text
alone; and routing runs in the dtype asked for. Expected values come from transformers' own forward pass with
`output_router_logits` on one text at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.tiny_models import make_base, make_expert, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

import moemerge.tools.routing as routing
from moemerge.errors import OptionError
from moemerge.output.merge import MergeOptions, merge
from moemerge.tools.routing import load_moe, route_texts, routing_dtype

CPU = torch.device("cpu")
# Passes over other shapes round differently: within 1e-5 of the largest |logit| in float32 (about 100 float32
# ulps through three layers; a text that sees padding or another text is off by tenths). bfloat16 against
# float32: within 15% (these tiny random models reach 12% through three layers), and off by more than float32's 1e-5
FLOAT32_RTOL, BFLOAT16_RTOL = 1e-5, 0.15
# lengths 4, 27, 3, 24, 2 (BOS included): every pass holds texts shorter than its longest
TEXTS = ["abc", "hello world, how are you now", "zz", "a b c d e f g h i j k l", "x"]
# (input family, output architecture); the Mistral base's sliding window is shorter than the longest texts
CASES = [("mistral", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case[1])
def moe(request, tmp_path_factory) -> Path:
    """A merge of three distinct experts under random routers, top-2."""
    family, architecture = request.param
    root = tmp_path_factory.mktemp(architecture)
    base = make_base(root / "base", family)
    experts = [make_expert(base, root / f"e{i}", seed=20 + i, scale=0.3) for i in range(3)]
    recipe = write_recipe(
        root / "r.yaml", base, experts, gate_mode="random", experts_per_token=2, architecture=architecture
    )
    merge(recipe, root / "out", MergeOptions(device="cpu", seed=7))
    return root / "out"


def _alone(out: Path, text: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The text by itself through transformers: router logits of its real tokens [layers, tokens, experts] (every
    layer routes in these merges) and each next token's negative log-likelihood."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    batch = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt", return_special_tokens_mask=True)
    ids, real = batch["input_ids"], ~batch["special_tokens_mask"][0].bool()
    with torch.no_grad():
        output = model(input_ids=ids, output_router_logits=True)
    logits = torch.stack([layer.float() for layer in output.router_logits])[:, real]
    losses = torch.nn.functional.cross_entropy(output.logits[0, :-1].float(), ids[0, 1:], reduction="none")
    return logits, losses


@pytest.mark.parametrize("losses", [False, True])
def test_texts_routed_together_get_what_each_gets_alone(moe, monkeypatch, losses):
    # 64 tokens a pass with losses: passes of texts (1, 2), (3, 4), (5); without: all five in one pass
    monkeypatch.setattr(routing, "LOSS_BATCH_TOKENS", 64)
    model, tokenizer, _ = load_moe(moe, CPU)
    passes = []
    model.register_forward_pre_hook(lambda _, args, kwargs: passes.append(len(kwargs["input_ids"])), with_kwargs=True)
    routings = list(route_texts(model, tokenizer, TEXTS, losses=losses))
    assert passes == ([2, 2, 1] if losses else [5])
    assert len(routings) == len(TEXTS)
    for text, got in zip(TEXTS, routings, strict=True):
        logits, token_losses = _alone(moe, text, torch.float32)
        assert got.logits.shape == logits.shape, text
        assert (got.logits - logits).abs().max() <= FLOAT32_RTOL * logits.abs().max(), text
        if losses:
            assert (got.token_losses - token_losses).abs().max() <= 1e-5, text
            assert got.loss == pytest.approx(float(token_losses.mean()), abs=1e-5)
        else:
            assert got.token_losses is None


def test_routing_runs_in_the_dtype_asked_for(moe):
    """bfloat16 routing is float32's up to bfloat16 rounding, and not float32's exactly."""
    references = [_alone(moe, text, torch.float32)[0] for text in TEXTS]
    for dtype, rtol in ((torch.float32, FLOAT32_RTOL), (torch.bfloat16, BFLOAT16_RTOL)):
        model, tokenizer, _ = load_moe(moe, CPU, dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        routings = list(route_texts(model, tokenizer, TEXTS))
        errors = [(r.logits - e).abs().max() / e.abs().max() for r, e in zip(routings, references, strict=True)]
        assert max(errors) <= rtol, (dtype, errors)
        if dtype == torch.bfloat16:
            assert max(errors) > 100 * FLOAT32_RTOL, "bfloat16 routing gave float32's logits: the dtype was not used"


def test_auto_dtype_is_bfloat16_only_on_a_cpu_that_computes_it(monkeypatch):
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(routing, "cpu_has_native_bf16", lambda native=native: native)
        assert routing_dtype("auto", CPU) == expected
        assert routing_dtype("auto", torch.device("cuda")) == torch.float32
        assert routing_dtype("float32", CPU) == torch.float32
        assert routing_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(OptionError, match=r"dtype 'float16': use auto, float32 or bfloat16"):
        routing_dtype("float16", CPU)
