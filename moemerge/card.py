"""The output's README.md: Hub metadata a model page needs, and a body a person wants to read."""

from __future__ import annotations

from typing import Any

import yaml

from moemerge.recipe import Recipe


def model_card(recipe: Recipe, recipe_text: str, stats: dict[str, Any], license_id: str | None) -> str:
    """Markdown with a YAML header; `stats` holds parameter counts, layers and the output name."""
    names = recipe.expert_names()
    sources = [recipe.base_model] + [e.source_model for e in recipe.experts]
    metadata: dict[str, Any] = {
        "base_model": list(dict.fromkeys(sources)),
        "base_model_relation": "merge",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "mixtral", "merge", "moemerge"],
    }
    if license_id:
        metadata["license"] = license_id
    rows = "\n".join(
        f"| {name} | `{e.source_model}` | {'; '.join(e.positive_prompts[:3]) or '—'} |"
        for name, e in zip(names, recipe.experts, strict=True)
    )
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {stats["name"]}

A Mixtral-style mixture of experts built with [moemerge](https://pypi.org/project/moemerge/) from
`{recipe.base_model}` and {len(names)} experts. Attention, embeddings and norms come from the base; each
expert contributes its MLP; routers were set with gate mode `{recipe.gate_mode}`, and
{recipe.experts_per_token} experts run per token.

| | |
|---|---|
| layers | {stats["layers"]} |
| experts | {len(names)} ({recipe.experts_per_token} per token) |
| parameters | {stats["total_params"]:,} total, {stats["active_params"]:,} active per token |

## Experts

| name | source | prompts (first three) |
|---|---|---|
{rows}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{stats["name"]}")
model = AutoModelForCausalLM.from_pretrained("{stats["name"]}")
inputs = tokenizer("Hello", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

## Recipe

```yaml
{recipe_text.strip()}
```
"""
