"""The built-in example end to end on the one real model we have offline: SmolLM2-135M + shipped adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from support.paths import ROOT

from moemerge import MergeOptions, merge
from moemerge.tools.routing import load_moe, route
from moemerge.tools.verify import verify

sys.path.insert(0, str(ROOT / "examples"))

from build_base import build_base  # noqa: E402

pytestmark = pytest.mark.slow  # builds the real SmolLM2 base and merges it

QUESTIONS = {
    "python": "Write a Python function that returns the squares of a list of numbers.",
    "legal": "What does the warranty disclaimer in a software licence say?",
    "math": "What is 48 + 76?",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    base = build_base(root / "base")
    recipe = yaml.safe_load((ROOT / "examples" / "demo_recipe.yaml").read_text())
    recipe["base_model"] = str(base)
    for expert in recipe["experts"]:
        expert["source_model"] = str(ROOT / "examples" / expert["source_model"])
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    merge(root / "recipe.yaml", root / "out", MergeOptions(device="cpu"))
    return root


def test_demo_output_verifies_and_routes_each_domain_to_its_expert(demo):
    verify(demo / "out", deep=True)
    model, tokenizer, names = load_moe(demo / "out", torch.device("cpu"))
    assert names == list(QUESTIONS)
    for domain, question in QUESTIONS.items():
        shares = route(model, tokenizer, question).shares()
        assert names[int(shares.argmax())] == domain, (domain, shares)


def test_tied_embeddings_become_an_explicit_lm_head(demo):
    from safetensors import safe_open

    out = demo / "out"
    index = yaml.safe_load((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        with safe_open(str(out / index[name]), "pt") as handle:
            tensors[name] = handle.get_tensor(name)
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_readme_demo_table_is_what_the_demo_prints(demo):
    """Every figure of the README's demo table: the share of (layer, token) top-2 slots per expert that
    examples/demo.py prints for each question, loading the output as the demo does (its default dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body = readme[readme.index("┡") : readme.index("└")].splitlines()[1:]
    shown = {cells[0]: cells[1:] for cells in ([c.strip() for c in row.strip("│").split("│")] for row in body)}
    assert list(shown) == list(QUESTIONS)
    out = demo / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    for domain, question in QUESTIONS.items():
        shares = route(model, tokenizer, question).shares()
        printed = [f"{s:.2f}" for s in shares.tolist()] + [list(QUESTIONS)[int(shares.argmax())]]
        assert shown[domain] == printed, (domain, shown[domain], printed)


def test_report_of_the_demo_renders_in_chromium(demo, tmp_path):
    """The report page of held-out domain texts, opened in headless Chromium: no console errors, nothing
    fetched, the heatmap shown, every expert's colour on screen."""
    import matplotlib
    import numpy
    from domains import domain_texts
    from PIL import Image
    from support.browser import opened

    from moemerge.tools.report import build_report, write_page

    model, tokenizer, names = load_moe(demo / "out", torch.device("cpu"))
    labelled = [(text, names.index(d)) for d in QUESTIONS for text in domain_texts(d, "heldout", 3, chars=400)]
    page_file = tmp_path / "demo.html"
    write_page(build_report(demo / "out", model, tokenizer, names, [], labelled, with_perplexity=True), page_file)
    with opened(page_file, tmp_path / "profile") as rendered:
        page = rendered.page
        heatmap = page.eval_on_selector("img.heatmap", "i => i.complete && i.naturalWidth")
        striped = page.eval_on_selector_all(
            "#texts .tokens span", "s => s.filter(e => getComputedStyle(e).backgroundImage.includes('gradient')).length"
        )
        rows = page.eval_on_selector_all("#labelled table tr", "rows => rows.length")
        page.screenshot(path=tmp_path / "demo.png", full_page=True)
        console, requests = rendered.console, rendered.requests
    assert console == [] and all(url.startswith(("file:", "data:")) for url in requests), (console, requests)
    assert heatmap > 200 and striped > 100 * len(labelled) and rows == 1 + len(names)
    pixels = numpy.asarray(Image.open(tmp_path / "demo.png").convert("RGB")).reshape(-1, 3).astype(int)
    for expert in range(len(names)):
        tab10 = numpy.array(matplotlib.colormaps["tab10"](expert)[:3]) * 255
        pastel = numpy.round(tab10 + (255 - tab10) * 0.55)
        assert (numpy.abs(pixels - pastel).max(axis=1) <= 2).any(), f"no token in {names[expert]}'s colour"
