"""Tokenizer, chat template and generation config come from the base unchanged, except for the portable
tokenizer class name, and the pad token set for batching never leaks into them."""

from __future__ import annotations

import json

from support.tiny_models import make_base, write_recipe
from transformers import AutoTokenizer

from moemerge import merge


def test_side_files_copied_and_tokenizer_portable(tmp_path):
    base = make_base(tmp_path / "base")
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    base_config = json.loads((base / "tokenizer_config.json").read_text())
    assert base_config["tokenizer_class"] == "TokenizersBackend"  # what transformers 5 writes
    merge(write_recipe(tmp_path / "r.yaml", base, [base, base]), tmp_path / "out")
    out = tmp_path / "out"
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    out_config = json.loads((out / "tokenizer_config.json").read_text())
    assert out_config.pop("tokenizer_class") == "PreTrainedTokenizerFast"
    base_config.pop("tokenizer_class")
    assert out_config == base_config  # nothing else changed: no pad token leaked from the gate batching
    assert "pad_token" not in out_config
    text = "abc xyz"
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
