"""Request routing: one decision per request, every layer's router restricted to the chosen experts.

References are computed with transformers alone: the dense model made of one expert (that expert's own
folder), and a smaller MoE sliced from the merged one by hand (only the chosen experts and their router rows)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.paths import CLI
from support.tiny_models import input_ids, load_model, logits_of, make_base, make_expert, write_recipe
from transformers import AutoConfig, AutoModelForCausalLM

from moemerge.output.merge import MergeOptions, merge
from moemerge.tools.evaluate import evaluate
from moemerge.tools.request_routing import Decision, RequestRouting, RoutingSettingsError, decide, restricted
from moemerge.tools.routing import load_moe

# (input family, `architecture:` in the recipe, or None for its default)
FAMILIES = [("llama", None), ("qwen2", None), ("qwen3", None), ("llama", "qwen2_moe")]
EXPERTS = 3
SCALE = 0.3  # expert MLPs far from the base's (init std 0.02), so each expert's logits differ clearly


def _build(root: Path, family: str, architecture: str | None):
    """A merged MoE of three distinct experts under random gates, top-2, and the experts' own folders."""
    base = make_base(root / "base", family)
    experts = [make_expert(base, root / f"e{i}", seed=10 + i, scale=SCALE) for i in range(EXPERTS)]
    fields = {"architecture": architecture} if architecture else {}
    recipe = write_recipe(root / "r.yaml", base, experts, gate_mode="random", experts_per_token=2, **fields)
    merge(recipe, root / "out", MergeOptions(device="cpu", seed=5))
    return load_model(root / "out"), experts, root / "out"


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f"{f[0]}-{f[1] or 'default'}")
def moe(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp(f"rr-{request.param[0]}"), *request.param)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """One family is enough for the command line."""
    return _build(tmp_path_factory.mktemp("rr-cli"), "llama", None)


def _router_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(model(ids, output_router_logits=True).router_logits)  # [layers, batch·tokens, E]


def test_forcing_each_expert_gives_that_expert_dense_logits(moe):
    model, experts, _ = moe
    ids = input_ids()
    dense = [logits_of(load_model(e), ids) for e in experts]
    assert min((a - b).abs().max() for a in dense for b in dense if a is not b) > 0.1  # the experts differ
    token_routed = logits_of(model, ids)
    for index, expected in enumerate(dense):
        with restricted(model, Decision.forced([index])):
            got = logits_of(model, ids)
        assert (got - expected).abs().max() <= 1e-5, index
    assert torch.equal(logits_of(model, ids), token_routed)  # hooks are gone after the block


def test_router_decision_top1_is_the_mean_probability_argmax_and_runs_that_expert(moe):
    model, experts, _ = moe
    ids = input_ids(batch=1)
    logits = _router_logits(model, ids)
    mean = torch.nn.functional.softmax(logits, dim=-1).mean(dim=(0, 1))  # over layers and tokens
    expected = int(mean.argmax())
    decision = decide(logits, top_k=1)
    assert decision.experts == (expected,) and decision.weights == (1.0,) and decision.decided_by == "router"
    with restricted(model, decision):
        got = logits_of(model, ids)
        seen = _router_logits(model, ids)  # the routers' raw logits stay visible (no -inf for the others)
    assert torch.equal(seen[0], logits[0]) and seen.isfinite().all()
    assert (got - logits_of(load_model(experts[expected]), ids)).abs().max() <= 1e-5
    two = decide(logits, top_k=2)
    top2 = mean.topk(2)
    assert two.experts == tuple(top2.indices.tolist())
    assert two.weights == pytest.approx((top2.values / top2.values.sum()).tolist())


def _sliced(model, out: Path, keep: list[int], zero_router: bool = False):
    """The merged MoE with only experts `keep` (and their router rows): a smaller MoE transformers runs itself."""
    config = AutoConfig.from_pretrained(out)
    key = "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"
    setattr(config, key, len(keep))
    small = AutoModelForCausalLM.from_config(config).eval()
    state = {}
    index = torch.tensor(keep)
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.gate.weight"):
            tensor = torch.zeros_like(tensor[index]) if zero_router else tensor[index]
        elif ".mlp.experts." in name:
            tensor = tensor[index]
        state[name] = tensor
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("keep", [[0, 2], [2, 1]])
def test_router_mixing_among_two_chosen_equals_a_two_expert_moe(moe, keep):
    model, _, out = moe
    ids = input_ids()
    with restricted(model, Decision.forced(keep, mixing="router")):
        got = logits_of(model, ids)
    expected = logits_of(_sliced(model, out, keep), ids)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - logits_of(model, ids)).abs().max() > 1e-3  # not today's three-expert routing


def test_router_mixing_among_all_experts_is_token_routing(moe):
    """More chosen experts than experts_per_token: the router picks its top-2 and renormalises, as without hooks."""
    model, _, _ = moe
    ids = input_ids()
    with restricted(model, Decision.forced([2, 0, 1], mixing="router")):
        got = logits_of(model, ids)
    assert (got - logits_of(model, ids)).abs().max() <= 1e-5


def test_fixed_mixing_uses_the_decision_weights_for_every_token(moe):
    """Equal forced weights = a two-expert MoE whose router is all zeros (softmax 1/2, 1/2 everywhere)."""
    model, _, out = moe
    ids = input_ids()
    with restricted(model, Decision.forced([1, 2], mixing="fixed")):
        got = logits_of(model, ids)
    expected = logits_of(_sliced(model, out, [1, 2], zero_router=True), ids)
    assert (got - expected).abs().max() <= 1e-5
    with restricted(model, Decision.forced([1, 2], mixing="router")):
        assert (logits_of(model, ids) - got).abs().max() > 1e-3  # the two mixings differ


def test_fixed_mixing_with_unequal_weights_scales_each_expert_by_its_own_weight(moe):
    """Weights 0.7 / 0.3 = the zero-router two-expert MoE (1/2 each) with down_proj scaled by 1.4 and 0.6."""
    model, _, out = moe
    ids = input_ids()
    with restricted(model, Decision((1, 2), (0.7, 0.3), "router", "fixed")):
        got = logits_of(model, ids)
    small = _sliced(model, out, [1, 2], zero_router=True)
    with torch.no_grad():
        for name, param in small.named_parameters():
            if name.endswith("mlp.experts.down_proj"):
                param[0] *= 1.4
                param[1] *= 0.6
    assert (got - logits_of(small, ids)).abs().max() <= 1e-5
    with restricted(model, Decision.forced([1, 2], mixing="fixed")):
        assert (logits_of(model, ids) - got).abs().max() > 1e-3  # the weights matter


@pytest.mark.parametrize(
    "settings, field",
    [
        (RequestRouting(mode="request", top_k=0), "top_k"),
        (RequestRouting(mode="request", top_k=4), "top_k"),
        (RequestRouting(mode="sequence"), "mode"),
        (RequestRouting(mode="request", mixing="average"), "mixing"),
        (RequestRouting(mode="request", top_k=1, experts=("e1", "nobody")), "experts"),
        (RequestRouting(mode="request", top_k=2, experts=("e1", "e1")), "experts"),
        (RequestRouting(mode="token", experts=("e1",)), "mode"),
        (RequestRouting(mode="request", top_k=2, experts=("e1",)), "top_k"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(RoutingSettingsError) as caught:
        settings.checked(["e0", "e1", "e2"])
    assert caught.value.field == field


def test_good_settings_pass():
    good = (RequestRouting(), RequestRouting("request", 3), RequestRouting("request", 2, "fixed", ("e2", "e0")))
    for settings in good:
        assert settings.checked(["e0", "e1", "e2"]) is settings


def _labelled(model, tokenizer, texts: list[str]) -> list[tuple[str, int]]:
    """Each text labelled with the expert its mean router probability picks, computed here from transformers."""
    labelled = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, 1:]  # without BOS
        batch = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        logits = _router_logits(model, batch)[:, 1:]  # real tokens only
        labelled.append((text, int(torch.nn.functional.softmax(logits, -1).mean(dim=(0, 1)).argmax())))
    return labelled


TEXTS = ["abc def ghi", "the law of the land", "one plus one is two", "zzz yyy", "quick brown fox", "print x"]


def test_eval_request_accuracy_and_perplexity(moe):
    model, experts, out = moe
    loaded, tokenizer, names = load_moe(out, torch.device("cpu"))
    truth = _labelled(loaded, tokenizer, TEXTS)
    result = evaluate(loaded, tokenizer, names, truth, with_perplexity=True, request_top_k=1, decide_tokens=4)
    assert result.request_accuracy == [1.0 if any(lab == i for _, lab in truth) else None for i in range(EXPERTS)]
    # every label moved by one: none right
    shifted = [(text, (label + 1) % EXPERTS) for text, label in truth]
    wrong = evaluate(loaded, tokenizer, names, shifted, request_top_k=1, decide_tokens=4)
    assert all(a in (0.0, None) for a in wrong.request_accuracy)
    # perplexity under request routing: decided on the first 4 tokens (BOS + 3), scored on the rest, which here is
    # the expert the first 4 tokens pick, run alone
    nll = torch.zeros(EXPERTS)
    count = torch.zeros(EXPERTS)
    for text, label in truth:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        first = _router_logits(loaded, ids[:, :4])[:, 1:]
        chosen = int(torch.nn.functional.softmax(first, -1).mean(dim=(0, 1)).argmax())
        logits = logits_of(load_model(experts[chosen]), ids)[0]
        losses = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")[3:]
        nll[label] += losses.sum()
        count[label] += len(losses)
    for i in range(EXPERTS):
        if count[i]:
            assert result.request_perplexity[i] == pytest.approx(float(torch.exp(nll[i] / count[i])), rel=1e-5)


def test_cli_route_and_eval_report_request_decisions(mixtral, tmp_path):
    model, _, out = mixtral
    loaded, tokenizer, names = load_moe(out, torch.device("cpu"))
    truth = _labelled(loaded, tokenizer, TEXTS)
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "expert"])
        writer.writerows([(text, names[label]) for text, label in truth])
    report = tmp_path / "eval.json"
    run = subprocess.run(
        [CLI, "eval", str(out), str(data), "--device", "cpu", "--json", str(report)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    present = {label for _, label in truth}
    assert json.loads(report.read_text())["request_accuracy"] == [1.0 if i in present else None for i in range(3)]
    run = subprocess.run(
        [CLI, "route", str(out), TEXTS[0], "--json", "--device", "cpu", "--request-top-k", "2"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    decision = json.loads(run.stdout)["prompts"][0]["request"]
    assert list(decision["chosen"])[0] == names[truth[0][1]] and len(decision["chosen"]) == 2
    assert sum(decision["chosen"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, words",
    [
        (["route", "x", "--request-top-k", "0"], "--request-top-k"),
        (["route", "x", "--request-top-k", "4"], "--request-top-k"),
        (["eval", "DATA", "--request-top-k", "9"], "--request-top-k"),
        (["eval", "DATA", "--decide-tokens", "0"], "--decide-tokens"),
    ],
)
def test_cli_bad_request_values_get_one_line_error(mixtral, tmp_path, args, words):
    _, _, out = mixtral
    data = tmp_path / "data.csv"
    data.write_text("prompt,expert\nabc,0\n")
    command = [CLI, args[0], str(out), *[str(data) if a == "DATA" else a for a in args[1:]], "--device", "cpu"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], run.stderr


@pytest.mark.parametrize(("chosen", "per_token"), [((1, 3), 1), ((0, 2, 3), 2), ((0, 1, 2, 3), 2)])
def test_router_mixing_runs_at_most_experts_per_token(chosen, per_token):
    """Under router mixing each (layer, token) runs the router's own top `experts_per_token` among the chosen
    experts, however many were chosen; a reply's routing shares count those and report that top_k."""
    from moemerge.tools.reply_routing import ReplyRouting
    from moemerge.tools.request_routing import experts_run

    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(len(chosen)))
    decision = Decision(chosen, tuple(1 / len(chosen) for _ in chosen), "router", "router")
    ran = experts_run(decision, logits, per_token)
    among = logits[..., list(chosen)].topk(per_token, dim=-1).indices  # by definition: top-k of the chosen columns
    want = torch.tensor(chosen)[among]
    assert ran.shape == (3, 5, per_token)
    assert torch.equal(ran.sort(dim=-1).values, want.sort(dim=-1).values)

    routing = ReplyRouting(layers=3, experts=4, top_k=per_token, device=torch.device("cpu"), decision=decision)
    routing.add(tuple(logits), prompt=True)
    report = routing.report(["a", "b", "c", "d"])
    assert report["top_k"] == per_token
    assert sum(shares["prompt"] for shares in report["experts"].values()) == pytest.approx(per_token)
    counts = torch.bincount(want.reshape(-1), minlength=4).double() / (3 * 5)
    assert [report["experts"][n]["prompt"] for n in "abcd"] == pytest.approx(counts.tolist())
