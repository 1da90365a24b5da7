"""The MoE formats we write, and which one a merge gets: the recipe's `architecture:`, else the base's default."""

from __future__ import annotations

import logging
from typing import Any

from moemerge.errors import MoemergeError
from moemerge.files import check_object
from moemerge.formats.format import OutputFormat
from moemerge.formats.mixtral import Mixtral
from moemerge.formats.qwen2_moe import Qwen2Moe
from moemerge.formats.qwen3_moe import Qwen3Moe
from moemerge.inputs.families import InputFamily

log = logging.getLogger("moemerge")
FORMATS: dict[str, OutputFormat] = {f.name: f for f in (Mixtral(), Qwen2Moe(), Qwen3Moe())}


def choose_format(
    requested: str | None, family: InputFamily, base_config: dict[str, Any], shared_experts: int
) -> OutputFormat:
    """The recipe's format if it can hold this base (and its shared experts), else a one-line reason why not.
    Without a requested format, the base's default, or the first format that holds the shared experts."""
    name = requested or family.default_output
    holders = [f.name for f in FORMATS.values() if f.shared_experts >= shared_experts]
    switched = requested is None and name not in holders
    if switched:
        name = next((h for h in holders if not FORMATS[h].refusal(family, base_config)), holders[0])
    fmt = FORMATS[name]
    reason = fmt.refusal(family, base_config)
    if reason and switched:  # the format was not the user's choice, so its advice would go in a circle
        raise MoemergeError(
            f"shared_experts: only {' and '.join(holders)} hold{'s' * (len(holders) == 1)} a shared expert, and a "
            f"{family.name} base cannot become {name}: {reason.split('; use architecture')[0]}; remove shared_experts"
        )
    if reason:
        key = "architecture" if requested else "base_model"
        raise MoemergeError(f"{key}: a {family.name} base cannot become {name}: {reason}")
    if switched:
        log.info(f"shared_experts: writing {name}, the format with a shared expert, instead of {family.default_output}")
    if name not in holders:
        raise MoemergeError(
            f"shared_experts: {name} has no shared expert; use architecture: {' or '.join(holders)} or remove it"
        )
    return fmt


def config_tensors(
    config: Any, where: str, max_tensors: int | None = None
) -> tuple[OutputFormat, dict[str, tuple[int, ...]]]:
    """The format of an existing output, from its config.json's model_type, and every tensor it implies;
    a config that lacks a size, holds one that is not a whole number >= 1, or implies more tensors than
    `max_tensors` (what the index lists: a config claiming 10^9 experts) is named in one line."""
    fmt = format_of_config(config, where)
    sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", fmt.experts_key)
    for key in (*sizes, fmt.expert_size_key):
        value = config.get(key)
        if key in config and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MoemergeError(f"{where}: a size is not a whole number >= 1 ({key} is {value!r})")
    try:
        implied = config["num_hidden_layers"] * (1 + 3 * fmt.num_experts(config))
        if max_tensors is not None and implied > max_tensors:
            raise MoemergeError(
                f"{where}: {config['num_hidden_layers']} layers of {fmt.num_experts(config)} experts need "
                f"{implied} or more tensors, but the index lists {max_tensors}"
            )
        return fmt, fmt.expected_tensors(config)
    except KeyError as exc:
        raise MoemergeError(f"{where}: missing key {exc.args[0]}") from None
    except TypeError:
        raise MoemergeError(f"{where}: a size is not a whole number") from None


def format_of_config(config: Any, where: str) -> OutputFormat:
    """The format of an existing output, from its config.json's model_type."""
    check_object(config, where)
    fmt = next((f for f in FORMATS.values() if f.model_type == config.get("model_type")), None)
    if fmt is None:
        raise MoemergeError(
            f"{where}: model_type {config.get('model_type')!r} is not an MoE format moemerge writes; "
            "verify checks a merged output"
        )
    return fmt
