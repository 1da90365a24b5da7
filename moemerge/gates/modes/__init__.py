"""The gate modes moemerge computes, one module each, and the one entry point the merge calls."""

from __future__ import annotations

from moemerge.gates.modes import cheap_embed, hidden, random, trained
from moemerge.gates.modes.mode import GateContext, GateMode, GateResult, release

GATE_MODES: dict[str, GateMode] = {
    mode.name: mode for module in (hidden, cheap_embed, random, trained) for mode in module.MODES
}


def compute_gates(ctx: GateContext) -> GateResult:
    """Router weights for every layer by the recipe's gate mode; a capture's memory is freed before this
    returns."""
    try:
        return GATE_MODES[ctx.recipe.gate_mode].compute(ctx)
    finally:
        release(ctx.device)
