"""gate_mode generated: each expert continues its prompts as a dense model of its own, every continuation is
labelled with the expert that wrote it (moemerge.gates.expert_texts), and the routers are fitted on them as
trained gates are (moemerge.gates.modes.generated)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from support.tiny_models import VOCAB, make_base, make_expert, make_lora, read_tensors, save_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge import MergeOptions, merge
from moemerge.errors import MoemergeError
from moemerge.files import GENERATED_TEXTS
from moemerge.gates import expert_texts
from moemerge.gates.expert_texts import Continuation, labelled_texts, load_writer, write_expert_texts
from moemerge.gates.modes import generated
from moemerge.gates.router_inputs import pad_ready
from moemerge.inputs.experts import Expert
from moemerge.inputs.lora import LoraAdapter
from moemerge.inputs.recipe import ExpertSpec, GenerateSpec
from moemerge.inputs.sources import ModelSource

EOS = 2
GREEDY = GenerateSpec(continuations=2, unprompted=1, max_new_tokens=12, temperature=1e-4, top_p=1.0, seed=0)


def forced_expert(base: Path, path: Path, token: int, units: int = 8, strength: float = 1e3) -> Path:
    """A fine-tune whose last MLP adds a huge multiple of one direction whatever its input, so that after the
    final norm the hidden state points where `token`'s lm_head row makes `token` the likeliest next token.
    Each unit computes silu(x)·x = x²·sigmoid(x) >= 0, so the sum of a few never cancels the direction."""
    model = AutoModelForCausalLM.from_pretrained(base)
    mlp = model.model.layers[-1].mlp
    direction = model.lm_head.weight[token] / model.model.norm.weight
    units_in = torch.randn(units, direction.numel(), generator=torch.Generator().manual_seed(token))
    with torch.no_grad():
        for weight in (mlp.gate_proj.weight, mlp.up_proj.weight):
            weight.zero_()
            weight[:units] = units_in
        mlp.down_proj.weight.zero_()
        mlp.down_proj.weight[:, :units] = strength * direction[:, None]
        logits = model(torch.tensor([[5, 9, 14, 3]])).logits[0]
    assert (logits.argmax(dim=-1) == token).all(), "the forced expert does not force its token"
    return save_model(model, path)


def expert(index: int, path: Path, adapter: Path | None = None, base: Path | None = None) -> Expert:
    model = ModelSource(base or path, f"experts[{index}]")
    lora = LoraAdapter(adapter, f"experts[{index}]") if adapter else None
    return Expert(index, ExpertSpec(source_model=str(path)), model, lora, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generated")
    base = make_base(root / "base")
    return {
        "base": base,
        "a": forced_expert(base, root / "a", VOCAB.index("a")),
        "z": forced_expert(base, root / "z", VOCAB.index("z")),
        "eos": forced_expert(base, root / "eos", EOS),
        "random0": make_expert(base, root / "random0", seed=1, scale=0.3),
        "random1": make_expert(base, root / "random1", seed=2, scale=0.3),
    }


def write(models, experts: list[Expert], prompts: list[list[str]], spec: GenerateSpec, progress=None):
    model = load_writer(models["base"], torch.device("cpu"), torch.float32)
    tokenizer = pad_ready(tiny_tokenizer())
    return write_expert_texts(model, tokenizer, experts, prompts, spec, progress or (lambda _d, _n: lambda _k: None))


def letters(text: str) -> set[str]:
    return set(text.replace(" ", ""))


def test_each_continuation_is_labelled_with_the_expert_that_wrote_it(models):
    # Each expert's prompts look like the other expert's text: the label must come from the writer.
    prompts = [["zz zz", "zzz"], ["a a a", "aaaa aa"]]
    written = write(models, [expert(0, models["a"]), expert(1, models["z"])], prompts, GREEDY)
    # after its prompts' continuations, each expert's unprompted one, recorded with an empty prompt
    assert [(row.expert, row.prompt, row.sample) for row in written] == [
        (e, p, k) for e in range(2) for p, n in [*((p, 2) for p in prompts[e]), ("", 1)] for k in range(n)
    ]
    assert all(row.new_tokens == GREEDY.max_new_tokens for row in written)
    assert len({row.seed for row in written}) == len(written)
    texts, labels = labelled_texts(written, ["a-writer", "z-writer"], with_prompt=False)
    assert labels == [0] * 5 + [1] * 5
    assert [letters(text) for text in texts] == [{"a"}] * 5 + [{"z"}] * 5
    with_prompts, _ = labelled_texts(written, ["a-writer", "z-writer"], with_prompt=True)
    assert with_prompts == [row.prompt + row.text for row in written]


def _merged_lora(base: Path, tensors: dict[str, torch.Tensor], scale: float):
    """The base with B @ A · scale added to each adapted weight, by hand."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, lora_a in tensors.items():
            if ".lora_A." in name:
                target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[target] += tensors[name.replace("lora_A", "lora_B")] @ lora_a * scale
    return model


def test_an_expert_writes_what_its_dense_model_writes_greedily(models, tmp_path):
    """A LoRA expert, run after another expert in the same model, writes what transformers' greedy generate
    writes with the adapter merged by hand: the swap leaves nothing of the expert before, and left padding,
    positions and the KV cache are right for prompts of different lengths decoded together."""
    tensors = make_lora(models["base"], tmp_path / "lora", seed=3, rank=4, alpha=8)
    reference = _merged_lora(models["base"], tensors, scale=8 / 4)
    prompts = ["abc", "hello world, this is long", "q"]
    experts = [expert(0, models["z"]), expert(1, models["base"], tmp_path / "lora")]
    written = write(models, experts, [["zzz"], prompts], GREEDY)
    tokenizer = tiny_tokenizer()
    for row in [r for r in written if r.expert == 1]:  # the unprompted one writes after a line break
        ids = tokenizer(row.prompt or "\n", return_tensors="pt")["input_ids"]
        out = reference.generate(ids, do_sample=False, max_new_tokens=GREEDY.max_new_tokens, pad_token_id=EOS)
        new = out[0, ids.shape[1] :].tolist()
        want = tokenizer.decode(new[: new.index(EOS)] if EOS in new else new, skip_special_tokens=True)
        assert row.text == want, row.prompt


def test_same_seed_same_texts_and_another_seed_other_texts(models):
    experts = [expert(0, models["random0"]), expert(1, models["random1"])]
    prompts = [["abc", "hello"], ["xyz"]]
    spec = GenerateSpec(continuations=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=5)
    first = write(models, experts, prompts, spec)
    again = write(models, experts, prompts, spec)
    other = write(models, experts, prompts, spec.model_copy(update={"seed": 6}))
    assert [row.text for row in first] == [row.text for row in again]
    assert len({row.text for row in first}) > len(first) // 2, "continuations of a prompt should differ"
    assert sum(a.text != b.text for a, b in zip(first, other, strict=True)) > len(first) // 2


def test_texts_do_not_depend_on_how_rows_are_batched(models, monkeypatch):
    experts = [expert(0, models["random0"]), expert(1, models["random1"])]
    prompts = [["abc", "hello there", "q"], ["xyz", "st"]]
    spec = GenerateSpec(continuations=3, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    together = write(models, experts, prompts, spec)
    monkeypatch.setattr(expert_texts, "MAX_ROWS", 2)  # one prompt per batch, its samples cut in runs of two
    apart = write(models, experts, prompts, spec)
    assert [row.text for row in together] == [row.text for row in apart]


def test_progress_counts_every_token_at_every_step(models):
    prompts = [["abc", "hello"], ["xyz"]]
    spec = GenerateSpec(continuations=2, unprompted=1, max_new_tokens=6, temperature=1.0, seed=0)
    tasks: list[tuple[str, int, list[int]]] = []

    def task(description: str, total: int):
        tasks.append((description, total, []))
        return tasks[-1][2].append

    # the second expert stops at once: the steps it no longer needs still count, so the bar ends full
    write(models, [expert(0, models["random0"]), expert(1, models["eos"])], prompts, spec, task)
    [(description, total, steps)] = tasks
    assert "tokens" in description
    assert total == (3 * 2 + 2 * 1) * 6
    assert sum(steps) == total
    assert steps[:6] == [5] * 6  # the first expert's one batch: its prompts' four rows and its unprompted one


def test_an_expert_that_writes_only_special_tokens_is_refused(models):
    written = write(models, [expert(0, models["a"]), expert(1, models["eos"])], [["zz"], ["aa"]], GREEDY)
    assert [row.new_tokens for row in written] == [12, 12, 12, 0, 0, 0]
    with pytest.raises(MoemergeError, match=r"experts\[1\] \(eos-writer\): all 3 continuations .* empty"):
        labelled_texts(written, ["a-writer", "eos-writer"], with_prompt=False)


def test_blank_continuations_are_left_out_with_a_warning(caplog):
    rows = [
        Continuation(0, 0, 0, "p", "text", 1, 0),
        Continuation(0, 0, 1, "p", " \n", 0, 1),
        Continuation(1, 0, 0, "q", "more", 1, 2),
    ]
    with caplog.at_level(logging.WARNING, logger="moemerge"):
        texts, labels = labelled_texts(rows, ["first", "second"], with_prompt=False)
    assert (texts, labels) == (["text", "more"], [0, 1])
    assert "experts[0] (first): 1 of 2 continuations were empty" in caplog.text


# the whole mode: a merge with gate_mode generated


def generated_recipe(path: Path, models: dict[str, Path], experts: list[tuple[str, list[str]]], **generate) -> Path:
    recipe = {
        "base_model": str(models["base"]),
        "gate_mode": "generated",
        "dtype": "float32",
        "experts_per_token": 1,
        "generate": {"continuations": 3, "unprompted": 1, "max_new_tokens": 10, "temperature": 0.05, **generate},
        "training": {"steps": 100, "lr": 0.05},
        "experts": [{"source_model": str(models[key]), "name": key, "positive_prompts": p} for key, p in experts],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def routers(folder: Path) -> torch.Tensor:
    tensors = read_tensors(folder)
    return torch.stack([tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(3)])


@pytest.fixture(scope="module")
def writers_merged(models, tmp_path_factory) -> Path:
    """The 'a' writer and the 'z' writer, each given prompts of letters neither writes."""
    root = tmp_path_factory.mktemp("merged")
    recipe = generated_recipe(root / "r.yaml", models, [("a", ["q", "s t"]), ("z", ["o", "u v"])])
    merge(recipe, root / "out", MergeOptions(device="cpu"))
    return root / "out"


def test_the_routers_send_each_writers_text_to_it(writers_merged):
    moe = AutoModelForCausalLM.from_pretrained(writers_merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(writers_merged)
    assert torch.isfinite(routers(writers_merged)).all()
    for text, writer in (("aaa aaaa aa", 0), ("zz zzzz zzz", 1)):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = torch.stack(moe(ids, output_router_logits=True).router_logits)  # [layers, tokens, experts]
        letters = (ids[0] == VOCAB.index(text[0])).nonzero().squeeze(1)
        assert (logits[:, letters].argmax(dim=-1) == writer).all(), text


def test_the_output_keeps_what_the_experts_wrote(writers_merged):
    lines = (writers_merged / GENERATED_TEXTS).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(row["expert"], row["label"]) for row in rows] == [("a", 0)] * 7 + [("z", 1)] * 7
    assert [letters(row["continuation"]) for row in rows] == [{"a"}] * 7 + [{"z"}] * 7
    assert [row["prompt"] for row in rows[:7]] == ["q"] * 3 + ["s t"] * 3 + [""]
    assert len({row["seed"] for row in rows}) == 14  # one per continuation
    assert all(row["settings"]["seed"] == 0 and row["settings"]["max_new_tokens"] == 10 for row in rows)
    manifest = json.loads((writers_merged / "moemerge.json").read_text())
    assert manifest["generated_texts"] == {"file": GENERATED_TEXTS, "rows": 14}
    report = json.loads((writers_merged / "gate_training.json").read_text())
    assert report["train_prompts"] + report["holdout_prompts"] == 14
    card = (writers_merged / "README.md").read_text(encoding="utf-8")
    assert "## Texts the experts wrote" in card and f"All 14 are in `{GENERATED_TEXTS}`" in card
    assert "wrote 1 text from no prompt" in card
    assert "| a | 7 | 0 | 70 | `a a a a a a a a a a` |" in card


def test_the_same_seed_gives_the_same_routers(models, tmp_path):
    experts = [("random0", ["abc", "hello"]), ("random1", ["xyz", "st uv"])]
    recipe = generated_recipe(tmp_path / "r.yaml", models, experts, temperature=1.0)
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        merge(recipe, tmp_path / name, MergeOptions(device="cpu", seed=seed))  # generate.seed: the merge's
    texts = {name: (tmp_path / name / GENERATED_TEXTS).read_text() for name in ("first", "again", "other")}
    assert texts["first"] == texts["again"] != texts["other"]
    assert torch.equal(routers(tmp_path / "first"), routers(tmp_path / "again"))
    assert not torch.allclose(routers(tmp_path / "first"), routers(tmp_path / "other"))


def test_an_expert_that_writes_nothing_stops_the_merge(models, tmp_path):
    recipe = generated_recipe(tmp_path / "r.yaml", models, [("a", ["zz"]), ("eos", ["aa"])])
    with pytest.raises(MoemergeError, match=r"experts\[1\] \(eos\): all 4 continuations it wrote are empty"):
        merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert not (tmp_path / "out").exists()


def test_an_expert_with_no_prompt_to_continue_is_refused():
    rows = [Continuation(0, 0, 0, "p", "text", 1, 0)]
    with pytest.raises(MoemergeError, match=r"experts\[1\] \(second\): has no positive prompts to continue"):
        labelled_texts(rows, ["first", "second"], with_prompt=True)


@pytest.mark.parametrize("candidates", [1024, 3], ids=["nucleus-among-candidates", "nucleus-wider-than-candidates"])
def test_sampling_draws_from_the_nucleus_in_proportion(monkeypatch, candidates):
    """Top-p by its definition, computed here: the smallest set of likeliest tokens whose probabilities (at the
    temperature) sum to at least top_p; each is drawn in proportion to its probability, no other ever. Checked
    on 20,000 rows with a generator each, against a 5-sigma band per token; with 3 candidates the nucleus (5
    tokens) is wider than the candidates, so the full-sort path is the one checked."""
    monkeypatch.setattr(expert_texts, "CANDIDATES", candidates)
    logits = torch.tensor([2.0, 0.5, 1.4, -1.0, 1.0, 0.9, -3.0, 1.2])
    temperature, top_p, rows = 0.8, 0.85, 20_000
    probs = (logits / temperature).softmax(dim=0).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    nucleus, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    assert len(nucleus) == 5 and mass >= top_p  # the case is what the docstring says
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    drawn = expert_texts.sample_next(logits.expand(rows, -1), temperature, top_p, generators)
    counts = torch.bincount(drawn, minlength=len(probs)).tolist()
    for token, count in enumerate(counts):
        if token not in nucleus:
            assert count == 0, (token, counts)
            continue
        share = probs[token] / mass
        assert abs(count - rows * share) <= 5 * (rows * share * (1 - share)) ** 0.5, (token, counts)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_experts_write_in_bfloat16_only_on_a_cpu_that_computes_it_natively(models, tmp_path, monkeypatch, native):
    """A float32 output's experts write in bfloat16 where the CPU has it natively (twice as fast, and sampled
    text needs no more), else in float32: emulated bfloat16 is slow. The texts are the forced writers' either way."""
    monkeypatch.setattr(generated, "cpu_has_native_bf16", lambda: native)
    dtypes = []
    real_writer = generated.load_writer
    monkeypatch.setattr(generated, "load_writer", lambda *a: dtypes.append(a[2]) or real_writer(*a))
    recipe = generated_recipe(tmp_path / "r.yaml", models, [("a", ["q"]), ("z", ["o"])])
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert dtypes == [torch.bfloat16 if native else torch.float32]
    rows = [json.loads(line) for line in (tmp_path / "out" / GENERATED_TEXTS).read_text().splitlines()]
    assert [letters(row["continuation"]) for row in rows] == [{"a"}] * 4 + [{"z"}] * 4


def test_the_fitted_routers_are_sharpened(models, tmp_path, monkeypatch):
    """The written routers are SHARPNESS times the fitted ones, in every fitted layer (and only those: a layer
    left out of training keeps its hidden-state rows as they are)."""
    experts = [("random0", ["abc", "hello"]), ("random1", ["xyz", "st uv"])]
    recipe = generated_recipe(tmp_path / "r.yaml", models, experts, temperature=1.0)
    spec = yaml.safe_load(recipe.read_text())
    spec["training"]["layers"] = [0, 2]
    recipe.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(generated, "SHARPNESS", 1.0)
    merge(recipe, tmp_path / "plain", MergeOptions(device="cpu"))
    monkeypatch.setattr(generated, "SHARPNESS", 2.5)
    merge(recipe, tmp_path / "sharp", MergeOptions(device="cpu"))
    plain, sharp = routers(tmp_path / "plain"), routers(tmp_path / "sharp")
    assert plain.abs().sum() > 0
    torch.testing.assert_close(sharp[[0, 2]], 2.5 * plain[[0, 2]], rtol=1e-6, atol=0)
    torch.testing.assert_close(sharp[1], plain[1], rtol=0, atol=0)


@pytest.mark.parametrize("training", [{}, {"steps": 7}, {"steps": 9, "lr": 0.2}], ids=["defaults", "steps", "both"])
def test_the_fit_takes_the_modes_defaults_for_what_the_recipe_leaves_out(models, tmp_path, monkeypatch, training):
    """Generated texts are fitted in 60 steps at lr 0.05 (generated.FIT_DEFAULTS) unless the recipe's training
    block says otherwise, key by key; the other training keys are the recipe's."""
    seen = []
    real_fit = generated.fit_labelled
    monkeypatch.setattr(
        generated, "fit_labelled", lambda ctx, *rest: seen.append(ctx.recipe.training) or real_fit(ctx, *rest)
    )
    recipe = generated_recipe(tmp_path / "r.yaml", models, [("a", ["q"]), ("z", ["o"])])
    spec = yaml.safe_load(recipe.read_text())
    spec["training"] = {**training, "holdout": 0.5}
    recipe.write_text(yaml.safe_dump(spec))
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    [used] = seen
    assert (used.steps, used.lr) == (training.get("steps", 60), training.get("lr", 0.05))
    assert used.holdout == 0.5 and used.weight_decay == 0.01
