"""The MoE formats we write, and which one a merge gets: the recipe's `architecture:`, else the base's default."""

from __future__ import annotations

from typing import Any

from moemerge.errors import MoemergeError
from moemerge.formats.format import OutputFormat
from moemerge.formats.mixtral import Mixtral
from moemerge.formats.qwen2_moe import Qwen2Moe
from moemerge.formats.qwen3_moe import Qwen3Moe

FORMATS: dict[str, OutputFormat] = {f.name: f for f in (Mixtral(), Qwen2Moe(), Qwen3Moe())}
# mergekit-moe's spellings of the same formats, so its recipes read unchanged.
ALIASES = {"qwen": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def canonical_name(name: str) -> str:
    """The format a recipe's `architecture:` names; ValueError listing the choices otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown architecture {name!r}; moemerge writes {', '.join(FORMATS)}")
    return key


def choose_format(
    requested: str | None, family: str, default: str, base_config: dict[str, Any], shared_expert: bool
) -> OutputFormat:
    """The recipe's format if it can hold this base (and shared expert), else a one-line reason why not."""
    name = requested or default
    if requested is None and shared_expert and not FORMATS[name].holds_shared_expert:
        name = "qwen2_moe"  # the one format with a shared expert; refused below if the base does not fit
    output = FORMATS[name]
    key = "architecture" if requested else "base_model"
    reason = output.refusal(family, base_config)
    if reason:
        raise MoemergeError(f"{key}: a {family} base cannot become {name}: {reason}")
    if shared_expert and not output.holds_shared_expert:
        raise MoemergeError(f"shared_experts: {name} has no shared expert; use architecture: qwen2_moe or remove it")
    return output


def format_of_config(config: dict[str, Any], where: str) -> OutputFormat:
    """The format of an existing output, from its config.json's model_type."""
    for output in FORMATS.values():
        if output.model_type == config.get("model_type"):
            return output
    raise MoemergeError(f"{where}: model_type {config.get('model_type')!r} is not an MoE format moemerge writes")
