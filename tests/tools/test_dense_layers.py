"""The tools on outputs with dense layers (`moe_layers`) and with a shared expert.

A dense layer does not route: Qwen2-MoE and Qwen3-MoE give it no router (`mlp_only_layers`), Mixtral an all-zero
router in front of the same MLP in every slot. Routing accuracy, shares, `layers` and request decisions are
over the routing layers only. Expected values come from transformers' own router logits (one tensor per router,
in layer order) and from the experts' own folders; the routing layer is picked out by hand here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.paths import CLI
from support.tiny_models import input_ids, load_model, logits_of, make_base, make_expert, write_recipe

from moemerge.errors import MoemergeError
from moemerge.output.merge import MergeOptions, merge
from moemerge.tools.engine import Engine
from moemerge.tools.evaluate import evaluate
from moemerge.tools.moe_layers import moe_layers
from moemerge.tools.request_routing import Decision, RequestRouting, RoutingPlan, restricted
from moemerge.tools.routing import load_moe

EXPERTS = 3
TEXTS = ["abc def ghi", "the law of the land", "one plus one is two", "zzz yyy", "quick brown fox", "print x"]
CPU = torch.device("cpu")


def _build(root: Path, family: str, architecture: str, **fields) -> tuple[Path, list[Path]]:
    """A merged MoE of three distinct experts under random gates, top-2, and the experts' own folders."""
    base = make_base(root / "base", family)
    experts = [make_expert(base, root / f"e{i}", seed=10 + i, scale=0.3) for i in range(EXPERTS)]
    recipe = write_recipe(
        root / "r.yaml", base, experts, gate_mode="random", experts_per_token=2, architecture=architecture, **fields
    )
    merge(recipe, root / "out", MergeOptions(device="cpu", seed=5))
    return root / "out", experts


# (input family, architecture, moe_layers): one routing layer of three, and two of three
CASES = [("llama", "mixtral", [1]), ("qwen2", "qwen2_moe", [0, 2]), ("qwen3", "qwen3_moe", [1])]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[1]}-{c[2]}")
def dense(request, tmp_path_factory):
    family, architecture, moe = request.param
    out, _ = _build(tmp_path_factory.mktemp(f"dense-{architecture}"), family, architecture, moe_layers=moe)
    return out, moe


def _routing_logits(out: Path, moe: list[int], ids: list[int]) -> torch.Tensor:
    """[routing layers, tokens, experts] from transformers: Mixtral returns every layer's router logits (the
    dense ones' all zero), Qwen only the sparse layers'."""
    model = load_model(out)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
    layers = len(model.model.layers)
    if len(logits) == layers:  # Mixtral: the dense layers' routers are all zero
        assert all(not logits[i].any() for i in range(layers) if i not in moe)
        logits = [logits[i] for i in moe]
    assert len(logits) == len(moe)
    return torch.stack(logits)


def test_eval_scores_only_the_routing_layers(dense):
    """Accuracy per expert and per layer: the share of tokens whose highest router logit is the label, over
    the routing layers (an all-zero router's argmax, expert 0, is not a choice)."""
    out, moe = dense
    model, tokenizer, names = load_moe(out, CPU)
    labelled = [(text, i % EXPERTS) for i, text in enumerate(TEXTS)]
    result = evaluate(model, tokenizer, names, labelled)
    right = torch.zeros(EXPERTS, len(moe))
    tokens = torch.zeros(EXPERTS)
    for text, label in labelled:
        first = _routing_logits(out, moe, tokenizer(text)["input_ids"])[:, 1:].argmax(dim=-1)  # BOS left out
        right[label] += (first == label).float().sum(dim=1)
        tokens[label] += first.shape[1]
    assert result.accuracy == pytest.approx((right.sum(dim=1) / (tokens * len(moe))).tolist(), abs=1e-6)
    assert result.layer_accuracy == pytest.approx((right.sum(dim=0) / tokens.sum()).tolist(), abs=1e-6)
    assert result.layers == moe


def test_reply_shares_and_request_decision_count_only_the_routing_layers(dense):
    """Prompt shares: the fraction of (routing layer, prompt token) pairs whose top-2 holds the expert; the request
    decision: the top-2 of the mean router probability over the routing layers and the text's real tokens."""
    out, moe = dense
    engine = Engine.load(out, CPU)
    text = TEXTS[1]
    ids = engine.text_ids(text)
    final = list(engine.generate(ids, engine.params(max_tokens=1, temperature=0)))[-1]
    logits = _routing_logits(out, moe, ids)
    counts = torch.nn.functional.one_hot(logits.topk(2, dim=-1).indices, EXPERTS).sum(dim=(0, 1, 2))
    shares = [final.routing["experts"][n]["prompt"] for n in engine.names]
    assert sum(shares) == pytest.approx(2.0)
    assert shares == pytest.approx((counts / (len(moe) * len(ids))).tolist())
    assert final.routing["layers"] == len(moe)
    decision = engine.decide(RoutingPlan(RequestRouting("request", 2), text))
    top = logits[:, 1:].softmax(dim=-1).mean(dim=(0, 1)).topk(2)
    assert decision.experts == tuple(top.indices.tolist())
    assert decision.weights == pytest.approx((top.values / top.values.sum()).tolist())


def test_cli_route_json_names_the_routing_layers(dense):
    out, moe = dense
    run = subprocess.run(
        [CLI, "route", str(out), TEXTS[0], "--json", "--device", "cpu"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)["prompts"][0]
    assert sum(row["shares"].values()) == pytest.approx(2.0)
    assert row["layers"] == moe and len(row["layer_shares"]) == len(moe)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Qwen2-MoE from a Llama base with a shared expert (the base): the merge halves the routed experts."""
    root = tmp_path_factory.mktemp("shared")
    return _build(root, "llama", "qwen2_moe", shared_experts=[{"source_model": str(root / "base")}])


def test_forcing_one_expert_with_a_shared_expert_gives_the_dense_expert(shared):
    out, experts = shared
    model, _, _ = load_moe(out, CPU)
    ids = input_ids()
    token_routed = logits_of(model, ids)
    for index, expert in enumerate(experts):
        with restricted(model, Decision.forced([index])):
            got = logits_of(model, ids)
        assert (got - logits_of(load_model(expert), ids)).abs().max() <= 1e-5, index
    assert torch.equal(logits_of(model, ids), token_routed)  # the shared expert is back after the block


def test_a_model_in_which_no_layer_routes_is_refused_in_one_line(dense):
    out, _ = dense
    model, _, _ = load_moe(out, CPU)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.zero_()
    with pytest.raises(MoemergeError, match="no layer routes"):
        moe_layers(model)


class _MeanMlp(torch.nn.Module):
    """The mean of two MLPs' outputs: a dense layer of two experts mixed with weights 1/2 each."""

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.first(x) + 0.5 * self.second(x)


def test_fixed_mixing_with_a_shared_expert_is_the_mean_of_the_chosen_experts(shared):
    out, experts = shared
    model, _, _ = load_moe(out, CPU)
    ids = input_ids()
    with restricted(model, Decision.forced([0, 2], mixing="fixed")):
        got = logits_of(model, ids)
    reference = load_model(experts[0])
    other = load_model(experts[2])
    for layer, donor in zip(reference.model.layers, other.model.layers, strict=True):
        layer.mlp = _MeanMlp(layer.mlp, donor.mlp)
    assert (got - logits_of(reference, ids)).abs().max() <= 1e-5
