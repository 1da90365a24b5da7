"""`moemerge report` on a tiny merge, opened in headless Chromium: the page renders without console errors or
network requests, its heatmap decodes and shows, and each token's stripes, each text's request decision and
each label's accuracy are what the MoE's own router logits (read here with transformers) say."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import matplotlib
import numpy
import pytest
import torch
from PIL import Image
from support.browser import opened
from support.paths import CLI
from support.tiny_models import make_base, make_expert, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge.cli import _run
from moemerge.output.merge import merge

NAMES = ["e0", "e1", "e2"]
LABELLED = [
    ("aaaaaa ssss", 0),
    ("aaa ss aaa sa", 0),
    ("bbbbbb tttt", 1),
    ("bbb tt bbbt", 1),
    ("cccccc uuuu", 2),
    ("aaa bbb ccc uuu", 2),  # mixed: its tokens go to different experts
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 3-layer, 3-expert hidden-gate merge whose experts' prompts are different letters, and a labelled CSV."""
    root = tmp_path_factory.mktemp("report")
    base = make_base(root / "base")
    experts = [
        {"source_model": str(make_expert(base, root / name, seed=i + 1)), "name": name} for i, name in enumerate(NAMES)
    ]
    recipe = write_recipe(root / "recipe.yaml", base, experts, experts_per_token=2)
    merge(recipe, root / "out")
    rows = "".join(f"{text},{NAMES[label]}\n" for text, label in LABELLED)
    (root / "labelled.csv").write_text("prompt,expert\n" + rows)
    return root


@functools.cache
def _moe(out: Path):
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


def _router_probabilities(out: Path, text: str) -> torch.Tensor:
    """[layers, real tokens, experts] softmax of the MoE's router logits, from transformers directly."""
    model, tokenizer = _moe(out)
    batch = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    real = ~batch["special_tokens_mask"][0].bool()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], output_router_logits=True).router_logits
    return torch.stack([layer[real] for layer in logits]).softmax(dim=-1)


def _pastel(expert: int) -> tuple[int, int, int]:
    """matplotlib's tab10 colour of the expert, mixed 55% with white: the token stripes' colours."""
    red, green, blue, _ = matplotlib.colormaps["tab10"](expert)
    return tuple(round(255 * c + (255 - 255 * c) * 0.55) for c in (red, green, blue))


def _has_color(image: Image.Image, color: tuple[int, int, int], tolerance: int = 2) -> bool:
    pixels = torch.from_numpy(numpy.array(image.convert("RGB"))).reshape(-1, 3).int()
    return bool(((pixels - torch.tensor(color)).abs().amax(dim=1) <= tolerance).any())


def test_labelled_report_renders_in_chromium_and_shows_the_routers_choices(tiny, tmp_path):
    page_file = tmp_path / "report.html"
    run = subprocess.run(
        # float32: the expected choices below are transformers' in float32
        [CLI, "report", tiny / "out", "--dataset", tiny / "labelled.csv", "-o", page_file, "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    shot = tmp_path / "report.png"
    with opened(page_file, tmp_path / "profile") as rendered:
        page = rendered.page
        heatmap = page.eval_on_selector("img.heatmap", "i => [i.complete, i.naturalWidth, i.getBoundingClientRect()]")
        texts = page.eval_on_selector_all(
            "#texts .text",
            """rows => rows.map(row => ({
                spans: [...row.querySelectorAll('.tokens span')].map(
                    s => [s.className, s.textContent, getComputedStyle(s).backgroundImage]),
                request: row.querySelector('.request').textContent}))""",
        )
        table = page.eval_on_selector_all(
            "#labelled table tr", "rows => rows.slice(1).map(r => [...r.cells].map(c => c.textContent))"
        )
        page.screenshot(path=shot, full_page=True)
        console, requests = rendered.console, rendered.requests
    assert console == [], "the page logs no errors or warnings"
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    complete, width, box = heatmap
    assert complete and width > 200 and box["width"] > 200, "the heatmap decodes and is shown"
    assert len(texts) == len(LABELLED)
    for (text, label), shown in zip(LABELLED, texts, strict=True):
        probabilities = _router_probabilities(tiny / "out", text)
        assert "".join(piece for _, piece, _ in shown["spans"]) == text
        # three layers, three bands of one layer each: a token's stripes are its first choice in each layer
        expected = probabilities.argmax(dim=-1).T.tolist()
        assert [cls for cls, _, _ in shown["spans"]] == ["k" + "-".join(map(str, e)) for e in expected]
        assert all("linear-gradient" in style for _, _, style in shown["spans"])
        request = probabilities.mean(dim=(0, 1)).argmax()
        assert f"{NAMES[request]} 1.00" in shown["request"] and f"label: {NAMES[label]}" in shown["request"]
    for expert, row in enumerate(table):
        choices = torch.cat(
            [_router_probabilities(tiny / "out", t).argmax(dim=-1) for t, lab in LABELLED if lab == expert], dim=1
        )
        assert row[0] == NAMES[expert]
        assert abs(float(row[3]) - float((choices == expert).float().mean())) <= 5e-4, row
    image = Image.open(shot)
    assert image.width >= 1000
    for expert in range(len(NAMES)):
        assert _has_color(image, _pastel(expert)), f"no token striped in {NAMES[expert]}'s colour"
    yellow = tuple(round(255 * c) for c in matplotlib.colormaps["viridis"](1.0)[:3])
    assert _has_color(image, yellow, tolerance=3), "no heatmap cell at share 1 on screen"


def test_report_of_texts_is_one_file_that_names_the_texts_request(tiny, tmp_path):
    page_file = tmp_path / "texts.html"
    assert _run(["report", str(tiny / "out"), "cccccc uuuu", "aaaaaa ssss", "-o", str(page_file)]) is None
    page = page_file.read_text()
    assert page.count('class="text"') == 2 and 'class="heatmap"' in page
    for reference in ("http:", "https:", "<script", " href="):
        assert reference not in page, f"the page refers to something outside itself: {reference}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", None])
def test_the_page_names_the_dtype_it_routed_in(tiny, tmp_path, dtype):
    page_file = tmp_path / "texts.html"
    asked = [] if dtype is None else ["--dtype", dtype]
    assert _run(["report", str(tiny / "out"), "aaaaaa ssss", "-o", str(page_file), *asked]) is None
    native = torch.cpu._is_avx512_bf16_supported()  # auto: bfloat16 where the CPU computes it natively
    expected = dtype or ("bfloat16" if native else "float32")
    assert f"<th>routing computed in</th><td>{expected}</td>" in page_file.read_text()


def test_labelled_report_measures_perplexity_as_eval_does_with_the_same_options(tiny, tmp_path):
    options = ["--ppl", "--decide-tokens", "3", "--request-mixing", "fixed", "--request-top-k", "2"]
    page_file, numbers = tmp_path / "labelled.html", tmp_path / "eval.json"
    csv = str(tiny / "labelled.csv")
    report = ["report", str(tiny / "out"), "--dataset", csv, "-o", str(page_file), "--dtype", "float32"]
    assert _run([*report, *options]) is None
    assert _run(["eval", str(tiny / "out"), csv, "--json", str(numbers), *options]) is None
    result = json.loads(numbers.read_text())
    assert (result["decide_tokens"], result["request_mixing"]) == (3, "fixed")
    page = page_file.read_text()
    assert "<th>after 3: token routing</th>" in page
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", page)]
    assert [row[0] for row in rows] == NAMES
    for expert, row in enumerate(rows):
        perplexities = [result[key][expert] for key in ("perplexity", "scored_token_perplexity", "request_perplexity")]
        assert row[5:] == [f"{value:.3f}" for value in perplexities]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["hello", "--dtype", "float16"], "--dtype 'float16': use auto, float32 or bfloat16"),
        (["hello", "--decide-tokens", "0"], "--decide-tokens 0: must be at least 1"),
        (["hello", "--dataset", "{csv}"], "not both"),
        (["--dataset", "{csv}", "-o", "{csv}"], "is the --dataset file"),
        (["--ppl", "hello"], "--ppl needs --dataset"),
        (["hello", "-o", "{missing}/r.html"], "does not exist"),
    ],
)
def test_bad_report_requests_are_one_line_errors_and_write_nothing(tiny, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)  # where the default report.html would go
    csv = tiny / "labelled.csv"
    before = csv.read_bytes()
    args = [a.format(csv=csv, missing=tmp_path / "nowhere") for a in extra]
    assert _run(["report", str(tiny / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert csv.read_bytes() == before
    assert not list(tmp_path.glob("*.html"))
