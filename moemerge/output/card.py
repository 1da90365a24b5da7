"""The output's README.md: Hub metadata a model page needs, and a body a person wants to read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from moemerge.files import GENERATED_TEXTS, MODEL_CARD
from moemerge.hub.ids import origin_name, parse_hub_id
from moemerge.inputs.gate_modes import GATE_MODE_SPECS
from moemerge.inputs.recipe import Recipe

PROMPTS_SHOWN = 5
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)


def front_matter(text: str) -> dict[str, Any]:
    """The YAML header of a model card, or {} when there is none or it does not parse."""
    match = _FRONT_MATTER.match(text.lstrip("\ufeff"))
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(folder: Path, config: dict[str, Any]) -> str | None:
    """The base's licence: its model card's `license:` (how the Hub records it), else config.json's."""
    card = folder / MODEL_CARD
    if card.is_file():
        try:
            license_id = front_matter(card.read_text(encoding="utf-8")).get("license")
        except (OSError, UnicodeDecodeError):
            license_id = None
        if isinstance(license_id, str) and license_id.strip():
            return license_id.strip()
    license_id = config.get("license")
    return license_id if isinstance(license_id, str) and license_id.strip() else None


def _names(entry: Any, fallback: str) -> list[str]:
    """Hub ids (or folder names) of one recipe source; a model+adapter pair gives both."""
    if not isinstance(entry, dict):  # not resolved: read the recipe's string
        parts = [parse_hub_id(part) for part in fallback.split("+")]
        return [p[0] if p else Path(t.rstrip("/")).name or t for p, t in zip(parts, fallback.split("+"), strict=True)]
    if "model" in entry and "adapter" in entry:
        return [n for part in (entry["model"], entry["adapter"]) for n in _names(part, fallback)]
    return [origin_name(entry) or fallback]


def _cell(text: str, limit: int = 80) -> str:
    """One table cell: one line, pipes escaped, long prompts cut."""
    flat = " ".join(str(text).split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return flat.replace("|", "\\|").replace("`", "'")


def _prompts(prompts: list[str], file: str | None) -> str:
    shown = [f"`{_cell(p)}`" for p in prompts[:PROMPTS_SHOWN] if p.strip()]
    more = len(prompts) - PROMPTS_SHOWN
    if more > 0:
        shown.append(f"… {more} more")
    if file:
        shown.append(f"from `{_cell(file)}`")
    return "<br>".join(shown) or "—"


def _source_cell(entry: Any, text: str) -> str:
    if isinstance(entry, dict) and "model" in entry and "adapter" in entry:
        return f"{_source_cell(entry['model'], text)} + {_source_cell(entry['adapter'], text)}"
    if isinstance(entry, dict) and "id" in entry:
        commit = f"@{entry['commit'][:10]}" if entry.get("commit") else ""
        return f"[{entry['id']}](https://huggingface.co/{entry['id']}){commit}"
    return f"`{_cell(text)}`"


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _routing(recipe: Recipe, names: list[str], training: dict[str, Any] | None, model_ref: str) -> str:
    if training:
        layer_accuracy = training.get("layer_accuracy") or []
        expert_accuracy = training.get("expert_accuracy") or []
        mean = sum(layer_accuracy) / len(layer_accuracy) if layer_accuracy else None
        held_out = training.get("accuracy_on", "held-out") == "held-out"
        trained_on = f"{training.get('train_prompts', '?')} prompts ({training.get('train_tokens', '?')} tokens)"
        if sampled_from := training.get("labelled_prompts"):
            trained_on += f" of a sample drawn from {sampled_from} labelled prompts to fit the token budget"
        if held_out:
            tested = (
                f" and tested on {training.get('holdout_prompts', '?')} held-out prompts "
                f"({training.get('holdout_tokens', '?')} tokens)."
            )
            kind = "Held-out"
        else:
            tested = (
                "; no prompts were held out (holdout 0, or fewer than 2 prompts per expert), so the accuracy below "
                "is on the training prompts and says nothing about prompts the routers have not seen."
            )
            kind = "Training-set"
        lines = [f"The routers were trained on {trained_on}{tested}", ""]
        if mean is not None:
            lines.append(
                f"{kind} token accuracy (the router's top choice is the labelled expert), mean over layers: "
                f"**{mean:.3f}**; per layer: {' '.join(f'{a:.2f}' for a in layer_accuracy)}."
            )
        if expert_accuracy:
            lines += ["", f"| expert | {kind.lower()} accuracy |", "|---|---|"]
            lines += [
                f"| {_cell(n)} | {'—' if a is None else f'{a:.3f}'} |"  # None: no scored rows
                for n, a in zip(names, expert_accuracy, strict=False)
            ]
        return "\n".join(lines)
    return (
        f"The routers were {GATE_MODE_SPECS[recipe.gate_mode].card}; their accuracy has not been "
        "measured. To measure it, write a CSV of `prompt,expert` rows that were not used to build the gates "
        "and run:\n\n"
        f"```bash\nmoemerge eval {model_ref} held_out.csv      # routing accuracy per expert and per layer\n"
        f'moemerge route {model_ref} "def main():"      # which experts one prompt goes to\n```'
    )


def _generated(recipe: Recipe, names: list[str], rows: list[dict] | None) -> str:
    """What the experts wrote for the routers to be fitted on (gate_mode generated), one row per expert."""
    if rows is None:
        return ""
    spec = recipe.generate
    lines = [
        "## Texts the experts wrote",
        "",
        f"The routers were fitted on text the experts wrote themselves: each expert continued each of its positive "
        f"prompts {spec.continuations} times and wrote {spec.unprompted} text{'s' * (spec.unprompted != 1)} from no "
        f"prompt, up to {spec.max_new_tokens} tokens each (temperature {spec.temperature:g}, top-p {spec.top_p:g}, "
        f"seed {spec.seed}), and every text is labelled with the expert that wrote it. All {len(rows)} are in "
        f"`{GENERATED_TEXTS}`.",
        "",
        "| expert | continuations | empty | tokens written | one of them |",
        "|---|---|---|---|---|",
    ]
    for e, name in enumerate(names):
        mine = [row for row in rows if row["label"] == e]
        texts = [row["continuation"] for row in mine if row["continuation"].strip()]
        tokens = sum(row["new_tokens"] for row in mine)
        example = f"`{_cell(texts[0])}`" if texts else "—"
        lines.append(f"| {_cell(name)} | {len(mine)} | {len(mine) - len(texts)} | {tokens} | {example} |")
    return "\n".join(lines) + "\n\n"


def _picture(picture: dict[str, Any] | None) -> str:
    """The routing picture under the routing section, or why there is none (moemerge.json's routing_picture)."""
    if picture is None:
        return ""
    if not picture.get("file"):
        return f"\n\nThere is nothing to picture: {picture.get('reason') or 'no routing picture was drawn'}."
    return (
        f"\n\n![Per layer, the share of tokens whose first-choice expert is each expert]({picture['file']})\n\n"
        f"Where the routers send {picture['prompts']} ({picture['texts']} texts): per layer (rows) the share of "
        "tokens whose highest router logit is each expert (columns), with the routers applied to the base's "
        "router inputs (in the MoE, later layers drift from this; `moemerge report` shows the MoE's own routing)."
    )


def _caveat(stats: dict[str, Any]) -> str:
    return f" Note: {stats['caveat']}." if stats.get("caveat") else ""


def _shared_row(recipe: Recipe) -> str:
    if not recipe.shared_experts:
        return ""
    source = _cell(recipe.shared_experts[0].source_model)
    return f"\n| shared expert | {source}, in every layer, mixed half and half with the routed experts |"


def model_card(
    recipe: Recipe,
    recipe_text: str,
    stats: dict[str, Any],
    license_id: str | None,
    sources: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    repo_id: str | None = None,
    generated: list[dict] | None = None,
    picture: dict[str, Any] | None = None,
) -> str:
    """Markdown with a YAML header.

    `stats` holds `name` (the output folder's name), `model_type`, `title` and `class_name` (the format's),
    `layers`, `total_params`,
    `active_params` and optionally `caveat` (what a consumer does differently, see OutputFormat.caveat),
    `dtype`; `sources` is moemerge.json's record of what each recipe key resolved to; `training` is
    gate_training.json for trained gates; `repo_id` is the Hub repo the output is pushed to, if known;
    `generated` the labelled texts the experts wrote for generated gates; `picture` is moemerge.json's
    routing_picture.
    """
    sources = sources or {}
    names = recipe.expert_names()
    keys = ["base_model"] + [f"experts[{i}].source_model" for i in range(len(recipe.experts))]
    texts = [recipe.base_model] + [e.source_model for e in recipe.experts]
    ids = [n for key, text in zip(keys, texts, strict=True) for n in _names(sources.get(key), text)]
    metadata: dict[str, Any] = {}
    if license_id:
        metadata["license"] = license_id
    metadata.update(
        {
            "base_model": list(dict.fromkeys(ids)),
            "base_model_relation": "merge",
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["moe", stats["model_type"], "merge", "moemerge"],
        }
    )
    title = repo_id.split("/")[-1] if repo_id else stats["name"]
    model_ref = repo_id or f"./{stats['name']}"
    base_cell = _source_cell(sources.get("base_model"), recipe.base_model)
    rows = "\n".join(
        f"| {i} | **{_cell(name)}** | {_source_cell(sources.get(keys[i + 1]), e.source_model)} | "
        f"{_prompts(e.positive_prompts, e.positive_prompts_file)} | "
        f"{_prompts(e.negative_prompts, e.negative_prompts_file)} |"
        for i, (name, e) in enumerate(zip(names, recipe.experts, strict=True))
    )
    share = 100 * stats["active_params"] / stats["total_params"] if stats["total_params"] else 0
    dtype = f"\n| dtype | {stats['dtype']} |" if stats.get("dtype") else ""
    fence = _fence(recipe_text)
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()}
---

# {title}

A {stats["title"]} mixture of experts with {len(names)} experts ({", ".join(_cell(n) for n in names)}), built with
[moemerge](https://pypi.org/project/moemerge/) from the base {base_cell}. Attention, embeddings and norms come
from the base; each expert contributes its MLP; a router in every layer sends each token to
{recipe.experts_per_token} of the {len(names)} experts.

| | |
|---|---|
| experts | {len(names)}, {recipe.experts_per_token} per token |
| gate mode | `{recipe.gate_mode}`: {GATE_MODE_SPECS[recipe.gate_mode].card} |
| layers | {stats["layers"]} |{_shared_row(recipe)}
| parameters | {stats["total_params"]:,} total, {stats["active_params"]:,} active per token ({share:.0f}%) |{dtype}

## Experts

Each expert's router row points at what its positive prompts have in common (minus its negative prompts).

| # | name | source | positive prompts | negative prompts |
|---|---|---|---|---|
{rows}

{_generated(recipe, names, generated)}## Routing

{_routing(recipe, names, training, model_ref)}{_picture(picture)}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_ref}"
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto")
inputs = tokenizer("Write a Python function that reverses a string.", return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))
```

It loads as `{stats["class_name"]}`, in the tensor layout vLLM and llama.cpp's converter also read.{_caveat(stats)}

## Recipe

{fence}yaml
{recipe_text.strip()}
{fence}

Sources as resolved (Hub commits pin this merge) are recorded in `moemerge.json`.
"""
