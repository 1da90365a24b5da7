"""The base's files an output ships besides weights (tokenizer, chat template, generation config), as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moemerge.files import SIDE_FILES, TOKENIZER, TOKENIZER_CONFIG
from moemerge.output.writer import write_json


def copy_side_files(base: Path, out: Path) -> None:
    """Tokenizer, chat template and generation config byte for byte: what the base ships is what we ship,
    with one exception, made for compatibility: transformers 5 names its fast tokenizer class
    `TokenizersBackend`, which transformers 4 cannot load; `PreTrainedTokenizerFast` reads the same
    tokenizer.json in both (checked by tests/compat/check_consumers.py)."""
    for name in SIDE_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    tokenizer_config = out / TOKENIZER_CONFIG
    if tokenizer_config.is_file() and (out / TOKENIZER).is_file():
        try:
            config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return  # copied as it is; transformers will say what is wrong with it
        if isinstance(config, dict) and config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            write_json(tokenizer_config, config)
