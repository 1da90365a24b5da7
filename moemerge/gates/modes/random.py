"""`random` and `uniform_random`: seeded rows that know nothing of the experts (mergekit's baselines)."""

from __future__ import annotations

from functools import partial

from moemerge.gates.modes.mode import GateContext, GateMode, GateResult
from moemerge.gates.random_gates import random_gates
from moemerge.inputs.gate_modes import GATE_MODE_SPECS


def compute(mode: str, ctx: GateContext) -> GateResult:
    return GateResult(random_gates(mode, ctx.num_layers, len(ctx.recipe.experts), ctx.hidden_size, ctx.seed))


MODES = tuple(GateMode(GATE_MODE_SPECS[name], partial(compute, name)) for name in ("random", "uniform_random"))
