"""Vocabulary checks: an expert whose embedding table differs in size from the base's (usually added tokens).

The MoE takes embeddings, lm_head and tokenizer from the base, so an expert's added tokens cannot exist in
it. That is an error by default, naming the tokens; `--allow-vocab-mismatch` builds anyway with the base's
vocabulary, warns, and lists the left-out tokens in moemerge.json. Nothing is ever cut silently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from moemerge.arch import EMBEDDINGS
from moemerge.errors import MoemergeError
from moemerge.sources import ModelSource

_SHOWN = 5
log = logging.getLogger("moemerge")


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
    """The tokens the expert has and the base lacks ([] when there are none); raises unless `allow`.

    Fewer rows than the base only warns: the expert never saw those ids, which is harmless for its MLP and
    common when a padded vocabulary (Qwen's, say) was trimmed to the tokenizer's size."""
    want, got = _rows(base), _rows(expert)
    if got < want:
        log.warning(f"{label}: {got} embedding rows, the base's {want}; ids {got}..{want - 1} were never seen by it")
    if got <= want:
        return []
    extra = range(want, got)
    names = _tokens_by_id(expert.path)
    if not allow:
        raise MoemergeError(
            f"{label}: its vocabulary has {got} embedding rows, the base's {want}; it adds {len(extra)} token(s) "
            f"the base lacks: {_describe(extra, names)}. Use experts fine-tuned with the base's tokenizer, or pass "
            "--allow-vocab-mismatch to build with the base's vocabulary (the MoE then cannot produce them)"
        )
    return [names.get(i, f"id {i}") for i in extra]
