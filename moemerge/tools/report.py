"""`moemerge report`: one self-contained HTML page (styles and pictures inline, no script, nothing fetched) that
shows where a merged model routes some texts or a labelled set.

The numbers come from the tools that compute them: `routing.route_texts` (router logits per text, first-choice shares
per layer), `request_routing.decide` (the request-level decision) and, for a labelled set, `evaluate.evaluate`
(accuracy per layer, request accuracy, perplexity), which hands over each text's routing as it goes so nothing
is routed twice. This module only arranges them: token colouring, heatmaps, tables, the merge's records."""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import moemerge.plots as plots  # not `from moemerge import`: that reads as importing the package
from moemerge.files import MANIFEST, RECIPE_COPY, ROUTING_PICTURE, TRAINING_REPORT, read_json_object
from moemerge.tools.evaluate import DECIDE_TOKENS, EvalResult, evaluate
from moemerge.tools.moe_layers import moe_layers
from moemerge.tools.request_routing import Decision, decide
from moemerge.tools.routing import Routing, route_texts

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BANDS = 3  # layer bands a token's colour stripes show: early, middle, late layers
PANELS = 24  # per-text heatmaps drawn; with more texts, the rest are summed into one "all texts" panel


@dataclass
class TextView:
    """What the page shows of one text: its real tokens' text, their top expert per layer band, its first-choice
    shares per layer [layers, experts], its token count and its request-level decision."""

    pieces: list[str]
    band_experts: list[list[int]]  # [bands][tokens]
    shares: torch.Tensor
    tokens: int
    decision: Decision
    label: int | None = None


def band_edges(layers: int, bands: int = BANDS) -> list[tuple[int, int]]:
    """`bands` contiguous, near-equal ranges of layer positions covering 0..layers-1 (fewer if fewer layers)."""
    count = max(1, min(bands, layers))
    return [(layers * b // count, layers * (b + 1) // count) for b in range(count)]


def _pieces(tokenizer: PreTrainedTokenizerBase, text: str, real: torch.Tensor) -> list[str]:
    """Each real token's span of the text (offsets, so spaces and newlines stay as written); decoded tokens
    where the tokenizer gives no offsets."""
    encoded = tokenizer(text, return_special_tokens_mask=True, return_offsets_mapping=tokenizer.is_fast)
    ids = [i for i, keep in zip(encoded["input_ids"], real.tolist(), strict=True) if keep]
    if not tokenizer.is_fast:
        return [tokenizer.decode([i]) for i in ids]
    offsets = [span for span, keep in zip(encoded["offset_mapping"], real.tolist(), strict=True) if keep]
    return [text[start:end] for start, end in offsets]


def text_view(
    tokenizer: PreTrainedTokenizerBase, text: str, routing: Routing, request_top_k: int, label: int | None = None
) -> TextView:
    """A text's view from its routing: per band, each token's expert with the highest mean router probability
    over the band's layers; per layer, the share of tokens each expert is the first choice of."""
    probabilities = routing.logits.softmax(dim=-1)
    edges = band_edges(routing.logits.shape[0])
    bands = [probabilities[start:end].mean(dim=0).argmax(dim=-1).tolist() for start, end in edges]
    experts = routing.logits.shape[-1]
    shares = torch.stack([routing.top1_accuracy(e) for e in range(experts)], dim=1)
    pieces = _pieces(tokenizer, text, routing.real)
    return TextView(pieces, bands, shares, routing.logits.shape[1], decide(routing.logits, request_top_k), label)


def _image(data: bytes, alt: str, css: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _pastel(color: str) -> str:
    """An expert's colour mixed 55% with white, so text on it stays readable."""
    red, green, blue = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(c + (255 - c) * 0.55):02x}" for c in (red, green, blue))


def _token_styles(combinations: set[tuple[int, ...]]) -> str:
    """One CSS class per combination of band experts in use: horizontal stripes, first band on top."""
    rules = []
    for combo in sorted(combinations):
        step = 100 / len(combo)
        stops = ", ".join(
            f"{_pastel(plots.expert_color(e))} {i * step:.2f}% {(i + 1) * step:.2f}%" for i, e in enumerate(combo)
        )
        rules.append(f".k{'-'.join(map(str, combo))}{{background:linear-gradient({stops})}}")
    return "\n".join(rules)


def _tokens_html(view: TextView, combinations: set[tuple[int, ...]]) -> str:
    spans = []
    for position, piece in enumerate(view.pieces):
        combo = tuple(band[position] for band in view.band_experts)
        combinations.add(combo)
        spans.append(f'<span class="k{"-".join(map(str, combo))}">{html.escape(piece)}</span>')
    return "".join(spans)


def _decision_html(decision: Decision, names: list[str]) -> str:
    chosen = decision.report(names)["chosen"]
    return "<br>".join(
        f'<span class="chip" style="background:{plots.expert_color(names.index(n))}"></span>'
        f"{html.escape(n)} {weight:.2f}"
        for n, weight in chosen.items()
    )


def _legend(names: list[str], edges: list[tuple[int, int]], layers: list[int]) -> str:
    chips = " ".join(
        f'<span class="chip" style="background:{_pastel(plots.expert_color(e))}"></span>{html.escape(n)}'
        for e, n in enumerate(names)
    )
    where = ("top", "middle", "bottom") if len(edges) == 3 else tuple(f"stripe {b + 1}" for b in range(len(edges)))
    bands = "; ".join(f"{where[b]}: layers {layers[start]}–{layers[end - 1]}" for b, (start, end) in enumerate(edges))
    return (
        f'<p class="legend">{chips}</p><p class="legend">Each token is striped with the expert its routers favour '
        f"(highest mean router probability) in each band of layers, {bands}. Request: the experts one decision "
        "for the whole text picks (mean router probability over its tokens and layers), with their weights.</p>"
    )


def _header(out: Path, dtype: str) -> str:
    """The merge's records (gate mode and experts from moemerge.json, the training report, the recipe) and the
    dtype the page's routing was computed in."""
    manifest = read_json_object(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    rows = [
        ("model", out.name),
        ("architecture", manifest.get("architecture", "—")),
        ("gate mode", manifest.get("gate_mode", "—")),
        ("experts", ", ".join(manifest.get("expert_names") or []) or "—"),
        ("experts per token", manifest.get("experts_per_token", "—")),
        ("routing computed in", dtype),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    parts = [f'<table class="meta">{table}</table>']
    if (out / TRAINING_REPORT).is_file():
        training = json.dumps(read_json_object(out / TRAINING_REPORT), indent=1)
        parts.append(f"<details><summary>gate training report</summary><pre>{html.escape(training)}</pre></details>")
    if (out / RECIPE_COPY).is_file():
        recipe = (out / RECIPE_COPY).read_text(encoding="utf-8")
        parts.append(f"<details><summary>recipe</summary><pre>{html.escape(recipe)}</pre></details>")
    if (out / ROUTING_PICTURE).is_file():
        picture = _image((out / ROUTING_PICTURE).read_bytes(), "routing picture of the merge", "merge-picture")
        parts.append(f"<details><summary>the merge's routing picture</summary>{picture}</details>")
    return "\n".join(parts)


def _heatmap(views: list[TextView], names: list[str], layers: list[int], labelled: bool) -> str:
    """Per label, or per text (the first PANELS, then all texts together), first-choice shares per layer."""
    if labelled:
        groups = sorted({v.label for v in views if v.label is not None})
        panels = [_weighted([v for v in views if v.label == g]) for g in groups]
        titles = [f"labelled {names[g]}" for g in groups]
    else:
        panels = [v.shares for v in views[:PANELS]]
        titles = [f"text {i + 1}" for i in range(len(panels))]
        if len(views) > PANELS:
            panels.append(_weighted(views))
            titles.append(f"all {len(views)} texts")
    picture = plots.layer_shares(
        [p.tolist() for p in panels], titles, names, layers, "share of tokens whose first-choice expert is each expert"
    )
    return _image(picture, "layer by expert heatmap of first-choice shares", "heatmap")


def _weighted(views: list[TextView]) -> torch.Tensor:
    """Token-weighted mean of the views' shares [layers, experts]."""
    total = sum(v.tokens for v in views)
    return sum(v.shares * v.tokens for v in views) / max(1, total)


def _labelled_section(result: EvalResult, views: list[TextView], names: list[str], layers: list[int]) -> str:
    present = [e for e in range(len(names)) if result.prompts[e]]
    series = {"all": result.layer_accuracy} | {names[e]: result.expert_layer_accuracy[e] for e in present}
    colors = ["#000000"] + [plots.expert_color(e) for e in present]
    accuracy = plots.lines(series, layers, "layer", "top-1 accuracy", "routing accuracy per layer", colors)
    matrix = [_weighted([v for v in views if v.label == e]).mean(dim=0).tolist() for e in present]
    confusion = plots.confusion(matrix, [names[e] for e in present], names, "label × first-choice expert")
    columns = ["expert", "texts", "tokens", "accuracy", "request accuracy"]
    if result.perplexity is not None:
        columns += ["perplexity", f"after {result.decide_tokens}: token routing", "request routing"]
    rows = []
    for e in range(len(names)):
        values = [names[e], result.prompts[e], result.tokens[e], result.accuracy[e], result.request_accuracy[e]]
        if result.perplexity is not None:
            values += [result.perplexity[e], result.scored_token_perplexity[e], result.request_perplexity[e]]
        rows.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in values) + "</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return (
        '<section id="labelled"><h2>Labelled set</h2>'
        f'<table class="numbers"><tr>{head}</tr>{"".join(rows)}</table>'
        f"<p>Accuracy: the share of a label's tokens whose highest router logit is the label, over all layers; "
        f"request accuracy: the share of its texts whose request decision (top-{result.request_top_k}) puts the "
        "label first.</p>"
        f'<div class="plots">{_image(accuracy, "routing accuracy per layer", "accuracy")}'
        f"{_image(confusion, 'label by expert confusion matrix', 'confusion')}</div></section>"
    )


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table.meta th{text-align:left;padding-right:1em;font-weight:600}
table.numbers{border-collapse:collapse}table.numbers td,table.numbers th{border:1px solid #ccc;padding:2px 8px}
.chip{display:inline-block;width:.9em;height:.9em;margin:0 .25em 0 .6em;vertical-align:middle;border-radius:2px}
.text{display:grid;grid-template-columns:1fr 13em;gap:1em;border-top:1px solid #ddd;padding:.5em 0}
.tokens{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;line-height:1.7}
.request{font-size:13px}.legend{font-size:13px}
img{max-width:100%}.plots img{margin-right:1em;vertical-align:top}
"""


def render(
    out: Path,
    views: list[TextView],
    names: list[str],
    layers: list[int],
    result: EvalResult | None,
    dtype: str,
) -> str:
    """The page, as one HTML string; `dtype`: what the routing was computed in."""
    combinations: set[tuple[int, ...]] = set()
    texts = []
    for number, view in enumerate(views, start=1):
        label = f"<br>label: {html.escape(names[view.label])}" if view.label is not None else ""
        texts.append(
            f'<div class="text"><div class="tokens">{_tokens_html(view, combinations)}</div>'
            f'<div class="request"><b>text {number}</b>, {view.tokens} tokens{label}<br>request:<br>'
            f"{_decision_html(view.decision, names)}</div></div>"
        )
    labelled = "" if result is None else _labelled_section(result, views, names, layers)
    edges = band_edges(len(layers))
    heatmap = _heatmap(views, names, layers, result is not None)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>routing report: {html.escape(out.name)}</title>
<style>{STYLE}{_token_styles(combinations)}</style></head>
<body><h1>Routing report: {html.escape(out.name)}</h1>
<section id="header">{_header(out, dtype)}</section>
<section id="heatmap"><h2>First-choice shares per layer</h2>{heatmap}</section>
{labelled}
<section id="texts"><h2>Tokens by expert</h2>{_legend(names, edges, layers)}{"".join(texts)}</section>
</body></html>
"""


def build_report(
    out: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    texts: list[str],
    labelled: list[tuple[str, int]] | None = None,
    with_perplexity: bool = False,
    request_top_k: int = 1,
    decide_tokens: int = DECIDE_TOKENS,
    request_mixing: str = "router",
) -> str:
    """The report page for `texts`, or for the labelled set (evaluated once, its routings reused); routed in
    the model's dtype, which the header names."""
    views: list[TextView] = []
    result = None
    if labelled:

        def seen(index: int, routing: Routing) -> None:
            text, label = labelled[index]
            views.append(text_view(tokenizer, text, routing, request_top_k, label))

        result = evaluate(
            model, tokenizer, names, labelled, with_perplexity, request_top_k, decide_tokens, request_mixing, seen
        )
    else:
        routings = route_texts(model, tokenizer, texts)
        views = [text_view(tokenizer, t, r, request_top_k) for t, r in zip(texts, routings, strict=True)]
    layers = list(moe_layers(model).routing)
    return render(out, views, names, layers, result, str(model.dtype).removeprefix("torch."))


def write_page(page: str, path: Path) -> None:
    """Write the page whole or not at all: a temporary file beside `path`, renamed over it."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
