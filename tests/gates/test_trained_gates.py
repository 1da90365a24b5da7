"""Trained gates learn a separable labelled set; eval and route agree with router logits from transformers."""

from __future__ import annotations

import csv
import json
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from support.gate_reference import assert_rows_close, gate_rows, hidden_rows, router_inputs
from support.paths import CLI
from support.tiny_models import make_base, make_expert
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge import MergeOptions, merge
from moemerge.errors import MoemergeError

ALPHABETS = ["abcdefg", "stuvwxyz", "01.,?"]


def _texts(alphabet: str, count: int, rng: random.Random) -> list[str]:
    return [
        "".join(rng.choice(alphabet + " ") for _ in range(rng.randint(8, 20))).strip() or alphabet for _ in range(count)
    ]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["prompt,expert"] + [f'"{text}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    # The default small init: with the tests' larger one, attention mixes tokens so much by layer 3 that the
    # alphabets are no longer separable token by token (held-out accuracy ~0.83 whatever the training).
    base = make_base(root / "base", num_hidden_layers=4, initializer_range=0.02)
    experts = [make_expert(base, root / f"e{i}", seed=i, scale=0.005) for i in range(3)]
    rng = random.Random(0)
    names = ["letters", "late", "digits"]
    rows = [(t, names[e]) for e, a in enumerate(ALPHABETS) for t in _texts(a, 30, rng)]
    dataset = _write_csv(root / "train.csv", rows)
    heldout = _write_csv(
        root / "heldout.csv", [(t, str(e)) for e, a in enumerate(ALPHABETS) for t in _texts(a, 8, rng)]
    )
    recipe = {
        "base_model": str(base),
        "gate_mode": "trained",
        "dtype": "float32",
        "experts_per_token": 1,
        "dataset_csv": str(dataset),
        "training": {"steps": 150, "lr": 0.05, "seed": 0},
        "experts": [{"source_model": str(e), "name": n} for e, n in zip(experts, names, strict=True)],
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge(root / "r.yaml", root / "out", MergeOptions(device="cpu"))
    return root, heldout, names


def test_training_report_shows_high_heldout_accuracy(trained):
    root, _, _ = trained
    report = json.loads((root / "out" / "gate_training.json").read_text())
    assert report["holdout_prompts"] == 18 and report["train_prompts"] == 72
    assert len(report["layer_accuracy"]) == 4
    assert min(report["layer_accuracy"]) >= 0.9, report
    assert report["accuracy_on"] == "held-out"


def test_eval_matches_router_logits_from_transformers(trained, tmp_path):
    root, heldout, names = trained
    result_file = tmp_path / "eval.json"
    run = subprocess.run(
        [CLI, "eval", str(root / "out"), str(heldout), "--ppl", "--json", str(result_file)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(result_file.read_text())

    model = AutoModelForCausalLM.from_pretrained(root / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "out")
    correct = torch.zeros(3)
    tokens = torch.zeros(3)
    nll = torch.zeros(3)
    for line in heldout.read_text().splitlines()[1:]:
        text, label = line.rsplit(",", 1)
        ids = tokenizer(text.strip('"'), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
            loss = model(ids, labels=ids).loss  # without router logits: no auxiliary loss in it
        top = torch.stack(out.router_logits)[:, 1:].argmax(dim=-1)  # skip BOS, as eval does
        correct[int(label)] += (top == int(label)).float().sum()
        tokens[int(label)] += top.shape[1]
        nll[int(label)] += loss * (ids.shape[1] - 1)
    expected = correct / (tokens * 4)
    assert result["accuracy"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert min(result["accuracy"]) >= 0.85
    assert result["tokens"] == tokens.int().tolist()
    lengths = tokens  # predicted tokens = real tokens (BOS predicts the first) per expert
    assert result["perplexity"] == pytest.approx(torch.exp(nll / lengths).tolist(), rel=1e-4)


def test_route_json_matches_router_logits(trained):
    root, _, names = trained
    prompt = "abc gfe dab"
    run = subprocess.run([CLI, "route", str(root / "out"), prompt, "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["experts"] == names
    model = AutoModelForCausalLM.from_pretrained(root / "out").eval()
    ids = AutoTokenizer.from_pretrained(root / "out")(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = torch.stack(model(ids, output_router_logits=True).router_logits)[:, 1:]
    top = logits.argmax(dim=-1)
    shares = torch.bincount(top.reshape(-1), minlength=3).float() / top.numel()
    row = data["prompts"][0]
    assert [row["shares"][n] for n in names] == pytest.approx(shares.tolist())
    assert row["top_expert"] == "letters"


def test_route_table_names_experts(trained):
    root, _, names = trained
    run = subprocess.run([CLI, "route", str(root / "out"), "0.1,0?", "xyz"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name in names:
        assert name in run.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("prompt,expert\nabc,9\n", "unknown expert '9'"),
        ("prompt,expert\n,0\n", "empty prompt"),
        ("text,expert\nabc,0\n", "missing column prompt"),
        ("prompt,expert\nabc,nobody\n", "unknown expert 'nobody'"),
    ],
)
def test_bad_dataset_is_refused(trained, tmp_path, content, message):
    root, _, _ = trained
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    (tmp_path / "bad.csv").write_text(content)
    recipe["dataset_csv"] = str(tmp_path / "bad.csv")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(MoemergeError, match=message):
        merge(tmp_path / "r.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _accuracy(rows: torch.Tensor, features: list[torch.Tensor], labels: list[int]) -> torch.Tensor:
    """Per layer: the share of tokens whose highest router logit is their text's expert."""
    hits = torch.zeros(rows.shape[0])
    for feature, label in zip(features, labels, strict=True):
        hits += (torch.einsum("lth,leh->lte", feature, rows.double()).argmax(dim=-1) == label).sum(dim=1)
    return hits / sum(f.shape[1] for f in features)


def _heldout_router_inputs(root: Path, heldout: Path) -> tuple[list[torch.Tensor], list[int]]:
    """Router inputs of the held-out texts, from hooks on the dense base (not moemerge's capture)."""
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    rows = list(csv.DictReader(heldout.open()))
    return [router_inputs(model, tokenizer, r["prompt"]) for r in rows], [int(r["expert"]) for r in rows]


def test_trained_rows_route_heldout_tokens_home(trained):
    """The fitted rows separate the three alphabets on texts never used for training, in every layer."""
    root, heldout, _ = trained
    features, labels = _heldout_router_inputs(root, heldout)
    accuracy = _accuracy(gate_rows(root / "out"), features, labels)
    assert (accuracy >= 0.9).all(), accuracy
    report = json.loads((root / "out" / "gate_training.json").read_text())
    assert report["accuracy_on"] == "held-out"


def test_untrained_layers_get_hidden_gates_that_route_by_content(trained, tmp_path):
    """Layers left out of training.layers get exactly the `hidden` rows of the same prompts (the dataset's rows),
    with the recipe's gate_scale, and so still send held-out texts to their experts."""
    root, heldout, _ = trained
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["training"]["layers"] = [2, 3]
    recipe["gate_scale"] = 7.0
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu"))
    report = json.loads((tmp_path / "out" / "gate_training.json").read_text())
    assert report["trained_layers"] == [2, 3]
    partial, full = gate_rows(tmp_path / "out"), gate_rows(root / "out")
    torch.testing.assert_close(partial[2:], full[2:])  # trained layers do not depend on the others

    prompts = [[], [], []]
    for row in csv.DictReader((root / "train.csv").open()):
        prompts[["letters", "late", "digits"].index(row["expert"])].append(row["prompt"])
    want = hidden_rows(root / "base", prompts, [[], [], []], 7.0)
    assert_rows_close(partial[:2], want[:2])

    features, labels = _heldout_router_inputs(root, heldout)
    accuracy = _accuracy(partial[:2], [f[:2] for f in features], labels)
    assert (accuracy >= 0.8).all(), accuracy


def test_without_held_out_prompts_the_accuracy_is_not_called_held_out(trained, tmp_path, caplog):
    root, _, _ = trained
    recipe = yaml.safe_load((root / "r.yaml").read_text())
    recipe["training"] = {"steps": 20, "lr": 0.05, "seed": 0, "holdout": 0}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with caplog.at_level("INFO", logger="moemerge"):
        merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu"))
    report = json.loads((tmp_path / "out" / "gate_training.json").read_text())
    assert report["holdout_prompts"] == 0 and report["accuracy_on"] == "training"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Training-set token accuracy" in card and "no prompts were held out" in card
    assert "held-out prompts" not in card and "Held-out" not in card and "held-out accuracy" not in card
    logged = [r.getMessage() for r in caplog.records if "routing accuracy" in r.getMessage()]
    assert len(logged) == 4 and all("training routing accuracy" in m for m in logged), logged


def test_one_prompt_per_expert_leaves_nothing_to_hold_out():
    """With fewer than 2 prompts per expert no prompt is held out, whatever `holdout` says: the report says the
    accuracy is on the training prompts."""
    from moemerge.gates.trained import train_gates
    from moemerge.inputs.recipe import TrainingSpec

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 12, 8, generator=generator)
    owners = torch.arange(3).repeat_interleave(4)  # three prompts of four tokens, one per expert
    inputs = SimpleNamespace(  # captured router inputs, as the streamed capture hands them out layer by layer
        owners=owners,
        options=SimpleNamespace(device=torch.device("cpu")),
        layers=lambda count, keep, on_batch=None: (layer[keep] for layer in features[:count]),
    )
    rows, report = train_gates(inputs, [0, 1, 2], 3, TrainingSpec(steps=5, holdout=0.5), [0, 1], 10_000)
    assert rows.shape == (2, 3, 8)
    assert report.holdout_prompts == 0 and report.train_prompts == 3 and report.accuracy_on == "training"


def _captured(features: torch.Tensor, owners: torch.Tensor) -> SimpleNamespace:
    """Router inputs [layers, tokens, hidden] of prompts `owners` [tokens], as the streamed capture hands them out."""
    return SimpleNamespace(
        owners=owners,
        options=SimpleNamespace(device=torch.device("cpu")),
        layers=lambda count, keep, on_batch=None: (layer[keep] for layer in features[:count]),
    )


def test_reported_accuracy_is_scored_on_the_held_out_prompts_only():
    """Each prompt is its own random direction, so the fit learns the training prompts by heart and cannot
    generalise: its accuracy there is 1, on held-out prompts near chance. The report must give the held-out
    figure, computed here from the returned rows on the tokens of the prompts split_prompts holds out."""
    from moemerge.gates.trained import train_gates
    from moemerge.inputs.prompts import split_prompts
    from moemerge.inputs.recipe import TrainingSpec

    experts, prompts_per_expert, tokens_per_prompt, hidden = 3, 10, 4, 64
    generator = torch.Generator().manual_seed(5)
    labels = [e for e in range(experts) for _ in range(prompts_per_expert)]
    directions = torch.randn(len(labels), hidden, generator=generator)
    owners = torch.arange(len(labels)).repeat_interleave(tokens_per_prompt)
    features = (directions[owners] + 0.01 * torch.randn(len(owners), hidden, generator=generator))[None]
    spec = TrainingSpec(steps=200, lr=0.05, holdout=0.3, seed=0)
    rows, report = train_gates(_captured(features, owners), labels, experts, spec, [0], 10_000)

    train, held = split_prompts(labels, spec.holdout, spec.seed)
    token_labels = torch.tensor(labels)[owners]

    def accuracy(prompts: list[int]) -> float:
        tokens = torch.isin(owners, torch.tensor(prompts))
        predicted = (features[0, tokens] @ rows[0].T).argmax(dim=-1)
        return (predicted == token_labels[tokens]).double().mean().item()

    assert accuracy(train) == 1.0 and accuracy(held) < 0.9  # the two figures differ: the test can tell them apart
    assert report.accuracy_on == "held-out" and report.holdout_prompts == len(held) == 9
    assert report.holdout_tokens == len(held) * tokens_per_prompt
    assert report.layer_accuracy == pytest.approx([accuracy(held)], abs=1e-6)


def test_fitted_rows_are_divided_by_the_input_scale():
    """Inputs are divided by their mean norm while fitting and the rows by the same norm afterwards, so the
    router logits do not depend on the inputs' scale: inputs 8 times larger give rows 8 times smaller (8, a
    power of two, keeps the normalised inputs bit for bit the same)."""
    from moemerge.gates.trained import fit_gates
    from moemerge.inputs.recipe import TrainingSpec

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % 3
    features = torch.randn(2, 60, 16, generator=generator) + torch.nn.functional.one_hot(labels, 16)[None] * 3.0
    spec = TrainingSpec(steps=30, lr=0.05)
    rows = fit_gates(features, labels, 3, spec)
    larger = fit_gates(features * 8, labels, 3, spec)
    assert rows.abs().max() > 0
    torch.testing.assert_close(larger * 8, rows, rtol=1e-5, atol=1e-7)


def test_classes_are_weighted_equally_whatever_their_token_counts():
    """Tokens that cannot be told apart (one input vector), 90 labelled 0 and 10 labelled 1: the fit that weighs
    both classes equally gives them equal probability (0.5 each), where an unweighted cross-entropy would
    learn the token counts (0.9 and 0.1)."""
    from moemerge.gates.trained import fit_gates
    from moemerge.inputs.recipe import TrainingSpec

    generator = torch.Generator().manual_seed(2)
    vector = torch.randn(16, generator=generator)
    features = vector.expand(1, 100, 16).clone()
    labels = torch.tensor([0] * 90 + [1] * 10)
    rows = fit_gates(features, labels, 2, TrainingSpec(steps=300, lr=0.05))
    probabilities = (rows[0] @ vector).softmax(dim=-1)
    assert probabilities[1].item() == pytest.approx(0.5, abs=0.1), probabilities


@pytest.mark.parametrize(("tokens", "drawn"), [(100, 100), (1000, 512), (5290, 1322), (40_000, 4096)])
def test_each_step_draws_a_quarter_of_the_set_within_bounds(monkeypatch, tokens, drawn):
    """A fitting step draws a quarter of the set's tokens, at least 512 (all of a smaller set) and at most
    4096: drawing nearly all of a small set at every step costs time and gives no better routers."""
    from moemerge.gates.trained import fit_gates
    from moemerge.inputs.recipe import TrainingSpec

    sizes = []
    real_randint = torch.randint

    def spy(high, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_randint(high, size, *args, **kwargs)

    monkeypatch.setattr(torch, "randint", spy)
    features = torch.randn(1, tokens, 8, generator=torch.Generator().manual_seed(0))
    fit_gates(features, torch.arange(tokens) % 2, 2, TrainingSpec(steps=3))
    assert sizes == [(drawn,)] * 3
