"""The gate modes a recipe may name, declared without their code: what each needs from the recipe and how
the model card describes its routers. Reading a recipe must not import the gate code (moemerge.gates, with
torch and transformers behind it), so this table is what the recipe, the model card, the CLI help and the
benchmarks read; each mode's computation lives in moemerge/gates/modes/, registered under the same name
(tests/gates/test_gate_mode_names.py pins the two together)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Needs(Enum):
    """What a gate mode needs from the recipe, checked when the recipe is read; the value says it in help."""

    NOTHING = "nothing"
    PROMPTS = "each expert's prompts"  # positive (or negative), inline, from files or dataset rows
    DATASET = "dataset_csv"  # a labelled dataset (its rows also count as prompts)


@dataclass(frozen=True)
class GateModeSpec:
    """One gate mode as the recipe and the model card see it."""

    name: str  # the recipe's `gate_mode:` value
    needs: Needs
    card: str  # completes "The routers were ..." in the model card

    @property
    def needs_prompts(self) -> bool:
        """Whether every expert must bring prompts (a labelled dataset brings them too)."""
        return self.needs in (Needs.PROMPTS, Needs.DATASET)


GATE_MODE_SPECS: dict[str, GateModeSpec] = {
    spec.name: spec
    for spec in (
        GateModeSpec(
            "hidden", Needs.PROMPTS, "set from the hidden states each router really sees, for each expert's prompts"
        ),
        GateModeSpec("cheap_embed", Needs.PROMPTS, "set from the mean token embeddings of each expert's prompts"),
        GateModeSpec(
            "random", Needs.NOTHING, "random (standard normal); the model needs fine-tuning to route meaningfully"
        ),
        GateModeSpec(
            "uniform_random", Needs.NOTHING, "random (uniform); the model needs fine-tuning to route meaningfully"
        ),
        GateModeSpec(
            "trained", Needs.DATASET, "trained on labelled prompts (the router inputs of a dataset, per layer)"
        ),
    )
}
DEFAULT_GATE_MODE = "hidden"


def modes_help() -> str:
    """Every gate mode and what it needs, for the CLI's help."""
    return "; ".join(f"{spec.name} needs {spec.needs.value}" for spec in GATE_MODE_SPECS.values())


def mode_list() -> str:
    """'hidden, cheap_embed, ... or trained': every gate mode, for a message."""
    *first, last = GATE_MODE_SPECS
    return f"{', '.join(first)} or {last}"
