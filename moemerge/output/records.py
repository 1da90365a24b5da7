"""The files that say how an output was made: the recipe as given, moemerge.json (sources, expert names,
shard digests), the gate-training report and the model card. Written into the partial folder last."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moemerge.digests import manifest_entry
from moemerge.files import GENERATED_TEXTS, MANIFEST, MODEL_CARD, RECIPE_COPY, TRAINING_REPORT
from moemerge.gates.trained import TrainingReport
from moemerge.inputs.recipe import Recipe
from moemerge.output.card import base_license, model_card
from moemerge.output.open_inputs import Inputs
from moemerge.output.options import MergeOptions
from moemerge.output.routing_picture import PictureRecord
from moemerge.output.writer import write_json


@dataclass(frozen=True)
class Made:
    """What a merge did, as its records tell it."""

    recipe: Recipe
    recipe_text: str
    options: MergeOptions
    inputs: Inputs
    sources: dict[str, Any]  # recipe key → what it resolved to (HubFetcher.sources)
    digests: dict[str, str]  # shard → digest (moemerge.digests), as written
    training: TrainingReport | None
    caveat: str | None
    dtype: torch.dtype
    total_params: int
    active_params: int
    generated: list[dict] | None = None  # the labelled texts the experts wrote (gate_mode generated)
    picture: PictureRecord | None = None  # routing.png, or why there is none


def write_records(partial: Path, name: str, made: Made) -> None:
    """The recipe copy, the manifest, the training report (trained gates only), the experts' labelled texts
    (generated gates only) and the model card."""
    recipe, inputs = made.recipe, made.inputs
    (partial / RECIPE_COPY).write_text(made.recipe_text, encoding="utf-8")
    written = {}
    if made.generated is not None:
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in made.generated)
        (partial / GENERATED_TEXTS).write_text("".join(lines), encoding="utf-8")
        written = {"generated_texts": {"file": GENERATED_TEXTS, "rows": len(made.generated)}}
    write_json(
        partial / MANIFEST,
        {
            "expert_names": recipe.expert_names(),
            "gate_mode": recipe.gate_mode,
            "experts_per_token": recipe.experts_per_token,
            "seed": made.options.seed,
            "recipe": recipe.model_dump(mode="json"),
            "sources": made.sources,
            "architecture": inputs.out_format.name,
            "dropped_tokens": inputs.dropped_tokens,
            **written,
        }
        | manifest_entry(made.digests)  # checked by `moemerge verify`
        | ({"routing_picture": made.picture.as_dict()} if made.picture is not None else {}),
    )
    training = made.training.as_dict() if made.training is not None else None
    if training is not None:
        write_json(partial / TRAINING_REPORT, training)
    stats = {"name": name, "layers": inputs.shape.num_layers, "total_params": made.total_params}
    stats |= {"active_params": made.active_params}
    fmt = inputs.out_format
    stats |= {"model_type": fmt.model_type, "title": fmt.title, "class_name": fmt.class_name, "caveat": made.caveat}
    stats["dtype"] = str(made.dtype).removeprefix("torch.")
    base = inputs.base
    card = model_card(
        recipe,
        made.recipe_text,
        stats,
        base_license(base.path, base.config),
        made.sources,
        training,
        made.options.hub_repo_id,
        made.generated,
        made.picture.as_dict() if made.picture is not None else None,
    )
    (partial / MODEL_CARD).write_text(card, encoding="utf-8")
