"""routing.png: the picture of where the written routers send each expert's own prompts (or, for trained gates,
the labelled prompts held out from training), per layer, drawn into the partial folder after the routers are
final. Random routers have nothing to picture: none is drawn and the record says why."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import moemerge.plots as plots  # not `from moemerge import`: that reads as importing the package
from moemerge.files import ROUTING_PICTURE
from moemerge.gates.hidden import MAX_TOKENS
from moemerge.gates.modes.mode import GateContext
from moemerge.gates.prompt_shares import first_choice_shares
from moemerge.gates.trained import labelled_sample
from moemerge.inputs.prompts import ExpertPrompts, split_prompts
from moemerge.inputs.recipe import Recipe
from moemerge.inputs.sources import ModelSource

PROMPTS_PER_EXPERT = 32  # enough for a share per layer; the picture costs a fraction of the gate pass
RANDOM = ("random", "uniform_random")


@dataclass(frozen=True)
class PictureRecord:
    """What routing.png shows (moemerge.json's `routing_picture`); `file` None with `reason` when none was drawn."""

    file: str | None
    prompts: str  # which prompts: "each expert's own prompts" or "held-out labelled prompts"
    texts: int
    layers: list[int]
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _picture_prompts(recipe: Recipe, prompts: ExpertPrompts, tokenizer, hidden: int) -> tuple[list, list, str, int]:
    """(texts, their experts, what they are, max tokens): the trained gates' held-out prompts (the same sample
    and split as training), else up to PROMPTS_PER_EXPERT of each expert's positive prompts."""
    spec = recipe.training
    if recipe.gate_mode == "trained" and prompts.labelled:
        texts = [text for text, _ in prompts.labelled]
        labels = [label for _, label in prompts.labelled]
        chosen = labelled_sample(tokenizer, texts, labels, spec, hidden)
        _, held = split_prompts([labels[i] for i in chosen], spec.holdout, spec.seed)
        if held:
            picked = [chosen[i] for i in held]
            return [texts[i] for i in picked], [labels[i] for i in picked], "held-out labelled prompts", spec.max_tokens
    pairs = [(text, e) for e, group in enumerate(prompts.positive) for text in group[:PROMPTS_PER_EXPERT]]
    return [t for t, _ in pairs], [e for _, e in pairs], "each expert's own prompts", MAX_TOKENS


def draw_routing_picture(partial: Path, context: GateContext, gate_names: dict[int, str]) -> PictureRecord:
    """Draw routing.png into `partial` from the routers written there (`gate_names`: sparse layer → tensor
    name), or say why there is nothing to draw."""
    recipe, layers = context.recipe, sorted(gate_names)
    if recipe.gate_mode in RANDOM:
        reason = "the routers are random, so their routing carries no information about the experts"
        return PictureRecord(None, "", 0, layers, reason)
    tokenizer = context.tokenizer()
    texts, groups, what, max_tokens = _picture_prompts(recipe, context.prompts, tokenizer, context.hidden_size)
    if not texts or not layers:
        return PictureRecord(None, what, 0, layers, "there are no prompts or no MoE layers to route")
    written = ModelSource(partial, "the output").tensors
    routers = {layer: written.load(name).float() for layer, name in gate_names.items()}
    options = context.capture_options(context.batch_size)
    advance = context.progress.task("routing picture", len(texts) * (layers[-1] + 1))
    shares = first_choice_shares(context.base, tokenizer, texts, groups, routers, options, max_tokens, advance)
    names = recipe.expert_names()
    present = sorted(set(groups))
    panels = [f"{names[e]}'s prompts" if what.startswith("each") else f"labelled {names[e]}" for e in present]
    title = f"first-choice expert per layer, {what} ({len(texts)} texts), routers on the base's router inputs"
    picture = plots.layer_shares(shares[present].tolist(), panels, names, layers, title)
    (partial / ROUTING_PICTURE).write_bytes(picture)
    return PictureRecord(ROUTING_PICTURE, what, len(texts), layers)
