"""The names of the files moemerge reads and writes, and the one way it reads a JSON file.

Every module that opens `config.json`, a weight index or the manifest takes the name from here, so a name
is spelled once; `read_json_object` is the one place that turns a file that is not JSON, or JSON that is
not an object, into a one-line error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moemerge.errors import MoemergeError

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_INDEXES = (SAFETENSORS_INDEX, PICKLE_INDEX)  # in the order transformers prefers them
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "moemerge.json"  # what the merge recorded: sources, expert names, shard digests
MODEL_CARD = "README.md"
GENERATED_TEXTS = "generated_texts.jsonl"  # gate_mode generated: the labelled texts the experts wrote
RECIPE_COPY = "moemerge_recipe.yaml"  # the recipe as given
TRAINING_REPORT = "gate_training.json"  # trained gates' accuracy
ROUTING_PICTURE = "routing.png"  # where the routers send the prompts, per layer
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER = "tokenizer.json"
# What the output copies from the base besides weights: tokenizer, chat template, generation config.
SIDE_FILES = (
    TOKENIZER,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def read_json(path: Path) -> Any:
    """A JSON file, or one line saying it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoemergeError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:
        raise MoemergeError(f"{path}: not valid JSON (nested too deeply)") from None


def check_object(data: Any, where: str | Path) -> dict[str, Any]:
    """`data` if it is a JSON object, else one line naming `where`."""
    if not isinstance(data, dict):
        raise MoemergeError(f"{where}: not a JSON object")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, an index, the manifest)."""
    return check_object(read_json(path), path)
