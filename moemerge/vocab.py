"""Vocabulary checks: an expert whose embedding table differs in size from the base's (usually added tokens).

The MoE takes embeddings, lm_head and tokenizer from the base, so an expert's added tokens cannot exist in
it. That is an error by default, naming the tokens; `--allow-vocab-mismatch` builds anyway with the base's
vocabulary, warns, and lists the left-out tokens in moemerge.json. Nothing is ever cut silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from moemerge.errors import MoemergeError
from moemerge.sources import ModelSource

EMBEDDINGS = "model.embed_tokens.weight"
_SHOWN = 5


def _tokens_by_id(folder: Path) -> dict[int, str]:
    """Added tokens the folder's tokenizer defines (tokenizer.json, added_tokens.json), by id."""
    tokens: dict[int, str] = {}
    try:
        for entry in json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", []):
            tokens[int(entry["id"])] = str(entry["content"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no readable tokenizer.json: fall back to ids alone
    try:
        for content, token_id in json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).items():
            tokens[int(token_id)] = str(content)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return tokens


def _describe(ids: range, names: dict[int, str]) -> str:
    shown = [repr(names[i]) if i in names else f"id {i}" for i in list(ids)[:_SHOWN]]
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(shown) + more


def _rows(model: ModelSource) -> int:
    """Embedding rows from the weights; from config.json when only the MLP shards were fetched (Hub experts)."""
    if model.tensors.has(EMBEDDINGS):
        return model.tensors.shape(EMBEDDINGS)[0]
    return int(model.config["vocab_size"])


def vocab_mismatch(base: ModelSource, expert: ModelSource, label: str, allow: bool) -> list[str]:
    """The tokens the expert has and the base lacks ([] when the tables match); raises unless `allow`."""
    want, got = _rows(base), _rows(expert)
    if want == got:
        return []
    names = _tokens_by_id(expert.path)
    if got > want:
        extra = range(want, got)
        what = f"adds {len(extra)} token(s) the base lacks: {_describe(extra, names)}"
        dropped = [names.get(i, f"id {i}") for i in extra]
    else:
        what = f"lacks {want - got} token(s) the base has (ids {got}..{want - 1})"
        dropped = []
    if not allow:
        raise MoemergeError(
            f"{label}: its vocabulary has {got} embedding rows, the base's {want}; it {what}. Use experts "
            "fine-tuned with the base's tokenizer, or pass --allow-vocab-mismatch to build with the base's "
            "vocabulary (the MoE then cannot produce the expert's added tokens)"
        )
    return dropped
