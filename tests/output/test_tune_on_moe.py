"""`training.tune_on_moe`: routers refitted on the merged MoE's own router inputs.

The task's answer is known: expert e owns a set of letters, and every prompt is made of its expert's
letters only. Held-out routing accuracy is measured here, on fresh prompts, from the router logits
transformers computes for the written MoE.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import xxhash
from support.tiny_models import load_model, make_base, make_expert, read_tensors, tiny_tokenizer, write_recipe

from moemerge.errors import MoemergeError
from moemerge.output.merge import merge
from moemerge.tools.verify import verify

LETTERS = ["abcdefgh", "ijklmnop", "qrstuvwx"]


def prompts(expert: int, count: int, seed: int) -> list[str]:
    rng = random.Random(seed * 100 + expert)
    return ["".join(rng.choice(LETTERS[expert]) for _ in range(16)) for _ in range(count)]


def held_out_accuracy(folder, experts: range = range(len(LETTERS))) -> float:
    """Share of (token, layer) pairs whose top router logit is the token's expert, BOS left out, over the
    prompts of `experts`."""
    model, tokenizer = load_model(folder), tiny_tokenizer()
    correct = total = 0
    for expert in experts:
        for text in prompts(expert, 6, seed=99):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logits = model(ids, output_router_logits=True).router_logits
            for layer in logits:
                top = layer.reshape(-1, len(LETTERS))[1:].argmax(dim=-1)
                correct += int((top == expert).sum())
                total += top.numel()
    return correct / total


def merged(tmp_path, name: str, gate_mode: str, tune: bool, **fields) -> tuple:
    base = (
        make_base(tmp_path / "base", initializer_range=0.02) if not (tmp_path / "base").exists() else tmp_path / "base"
    )
    experts = []
    for i in range(len(LETTERS)):
        folder = tmp_path / f"e{i}"
        expert = folder if folder.exists() else make_expert(base, folder, seed=i + 1, scale=0.3)
        experts.append({"source_model": str(expert), "positive_prompts": prompts(i, 10, seed=1)})
    training = {"tune_on_moe": tune, "steps": 200, "lr": 0.05}
    recipe = write_recipe(tmp_path / f"{name}.yaml", base, experts, gate_mode=gate_mode, training=training, **fields)
    merge(recipe, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("gate_mode", ["hidden", "random"])
def test_tuning_on_the_moe_never_lowers_held_out_accuracy(tmp_path, gate_mode):
    plain = merged(tmp_path, "plain", gate_mode, tune=False)
    tuned = merged(tmp_path, "tuned", gate_mode, tune=True)
    before, after = held_out_accuracy(plain), held_out_accuracy(tuned)
    assert after >= before, (before, after)
    report = json.loads((tuned / "router_tuning.json").read_text())
    assert report["layers"] == [0, 1, 2]
    assert all(a >= b for a, b in zip(report["accuracy_after"], report["accuracy_before"], strict=True))
    if gate_mode == "random":  # random routers know nothing: tuning must find the letters
        assert before < 0.6 and after > 0.9, (before, after)
    # Only routers change; every other tensor is the plain merge's, bit for bit.
    a, b = read_tensors(plain), read_tensors(tuned)
    assert a.keys() == b.keys()
    changed = [name for name in a if not torch.equal(a[name], b[name])]
    assert changed and all(name.endswith("block_sparse_moe.gate.weight") for name in changed)
    # The digests recorded are those of the shards as they are after the routers were rewritten.
    recorded = json.loads((tuned / "moemerge.json").read_text())["shard_digests"]
    assert recorded == {
        "algorithm": "xxh3_128",
        "shards": {
            shard.name: xxhash.xxh3_128(shard.read_bytes()).hexdigest() for shard in tuned.glob("*.safetensors")
        },
    }


def test_tuning_needs_labelled_prompts(tmp_path):
    base = make_base(tmp_path / "base", initializer_range=0.02)
    experts = [
        {"source_model": str(make_expert(base, tmp_path / f"e{i}", seed=i)), "positive_prompts": []} for i in (1, 2)
    ]
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, gate_mode="random", training={"tune_on_moe": True})
    with pytest.raises(MoemergeError, match="training.tune_on_moe"):
        merge(recipe, tmp_path / "out")


def test_a_labelled_set_over_the_token_budget_is_sampled_before_tuning(tmp_path, monkeypatch):
    """The prompts' hidden states are held at one layer: a set larger than trained gates' token budget is
    sampled (stratified per expert) first, so that memory does not grow with the set."""
    from moemerge.gates import trained

    hidden = json.loads((make_base(tmp_path / "base", initializer_range=0.02) / "config.json").read_text())[
        "hidden_size"
    ]
    monkeypatch.setattr(trained, "FEATURE_BUDGET", 4 * hidden * 16 * 12)  # about 12 of the 30 16-letter prompts
    report = json.loads((merged(tmp_path, "tuned", "hidden", tune=True) / "router_tuning.json").read_text())
    used = report["train_prompts"] + report["holdout_prompts"]
    assert 2 * len(LETTERS) <= used <= 15, used


def test_an_expert_without_dataset_rows_is_tuned_on_its_own_prompts(tmp_path, caplog):
    """Hidden gates from every expert's prompts, a dataset with rows of experts 0 and 1 only: tuning says so
    and keeps routing expert 2's prompts to expert 2 (its positive prompts stand in for rows)."""
    plain = merged(tmp_path, "plain", "hidden", tune=False)
    rows = [(text, e) for e in (0, 1) for text in prompts(e, 10, seed=2)]
    (tmp_path / "d.csv").write_text("prompt,expert\n" + "".join(f"{t},{e}\n" for t, e in rows))
    with caplog.at_level("WARNING", logger="moemerge"):
        tuned = merged(tmp_path, "tuned", "hidden", tune=True, dataset_csv=str(tmp_path / "d.csv"))
    warned = [r.getMessage() for r in caplog.records if "tune_on_moe" in r.getMessage()]
    assert warned == [
        "training.tune_on_moe: experts[2] (e2) has no rows in d.csv; its positive prompts stand in for them, so "
        "that tuning does not learn never to route to it"
    ]
    before, after = held_out_accuracy(plain, range(2, 3)), held_out_accuracy(tuned, range(2, 3))
    assert after >= 0.9 and after >= before - 0.05, (before, after)


def test_tuning_refuses_an_expert_it_has_no_prompt_of(tmp_path):
    """Negative prompts only: hidden gates can build its row, but tuning would only learn never to choose it."""
    base = make_base(tmp_path / "base", initializer_range=0.02)
    experts = [{"source_model": str(base), "positive_prompts": prompts(i, 4, seed=1)} for i in (0, 1)]
    contrarian = {"name": "contrarian", "positive_prompts": [], "negative_prompts": prompts(0, 4, seed=1)}
    experts.append({"source_model": str(base), **contrarian})
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, training={"tune_on_moe": True})
    with pytest.raises(MoemergeError, match=r"training.tune_on_moe: experts\[2\] \(contrarian\) has no positive"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_refitted_router_as_accurate_as_the_current_one_replaces_it(tmp_path):
    """A router is replaced when the refitted one's held-out accuracy is at least as high. Trained gates route
    layer 0 perfectly (its router inputs are the base's), and so does the refit: a tie, which replaces it. The
    tuned output, whose shard was rewritten after its digest was first taken, passes `moemerge verify`."""
    base = make_base(tmp_path / "base", initializer_range=0.02)
    rows = ["prompt,expert"] + [f"{text},{e}" for e in range(len(LETTERS)) for text in prompts(e, 10, seed=1)]
    (tmp_path / "labelled.csv").write_text("\n".join(rows) + "\n")
    experts = [
        {"source_model": str(make_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.3)), "positive_prompts": []}
        for i in range(len(LETTERS))
    ]
    training = {"tune_on_moe": True, "steps": 200, "lr": 0.05}
    dataset = str(tmp_path / "labelled.csv")
    recipe = write_recipe(
        tmp_path / "r.yaml", base, experts, gate_mode="trained", dataset_csv=dataset, training=training
    )
    out = merge(recipe, tmp_path / "out").out
    report = json.loads((out / "router_tuning.json").read_text())
    assert report["accuracy_before"][0] == report["accuracy_after"][0] == 1.0, report  # the tie this test needs
    assert report["replaced"][0] is True
    assert verify(out, deep=True) > 0
