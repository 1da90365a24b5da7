"""Vocabulary checks: an expert whose embedding table differs in size from the base's (usually added tokens).

The MoE takes embeddings, lm_head and tokenizer from the base, so an expert's added tokens cannot exist in
it. That is an error by default, naming the tokens; `allow_vocab_mismatch` builds anyway with the base's
vocabulary, warns, and lists the left-out tokens in moemerge.json. Nothing is ever cut silently.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from moemerge.errors import OptionError
from moemerge.inputs.families import EMBEDDINGS
from moemerge.inputs.sources import ModelSource

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


@functools.lru_cache(maxsize=4)  # the base's, read once for all its experts
def _vocabulary(folder: Path) -> frozenset[str] | None:
    """Every token string the folder's tokenizer.json knows (model vocabulary and added tokens); None without
    a readable one."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab") or {}
        pieces = set(vocab) if isinstance(vocab, dict) else {str(entry[0]) for entry in vocab}  # Unigram: pairs
        return frozenset(pieces | {str(entry["content"]) for entry in data.get("added_tokens", [])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def _describe(tokens: list[str]) -> str:
    shown = [token if token.startswith("id ") else repr(token) for token in tokens[:_SHOWN]]
    more = f" and {len(tokens) - _SHOWN} more" if len(tokens) > _SHOWN else ""
    return ", ".join(shown) + more


def _rows(model: ModelSource) -> int:
    """Embedding rows from the weights; from config.json when only the MLP shards were fetched (Hub experts)."""
    if model.tensors.has(EMBEDDINGS):
        return model.tensors.shape(EMBEDDINGS)[0]
    return int(model.config["vocab_size"])


def vocab_mismatch(base: ModelSource, expert: ModelSource, tokenizer: Path, label: str, allow: bool) -> list[str]:
    """The tokens the expert has and the base lacks ([] when there are none); raises unless `allow`.

    Two ways to have them: embedding rows beyond the base's, or added tokens the base's tokenizer does not
    know, placed inside rows both have (a padded vocabulary, as Qwen's). Fewer rows than the base only warn:
    the expert never saw those ids, which is harmless for its MLP and common when a padded vocabulary was
    trimmed to the tokenizer's size. `tokenizer` is the folder whose tokenizer the expert was trained with:
    its model's, or its adapter's when the adapter ships one."""
    if expert is base and tokenizer == base.path:
        return []
    want, got = _rows(base), _rows(expert)
    if got < want:
        log.warning(f"{label}: {got} embedding rows, the base's {want}; ids {got}..{want - 1} were never seen by it")
    names = _tokens_by_id(tokenizer)
    added = [names.get(i, f"id {i}") for i in range(want, got)]
    known = _vocabulary(base.path)
    if known is not None:
        added += [token for i, token in sorted(names.items()) if i < want and token not in known]
    if not added or allow:
        return added
    rows = f"its vocabulary has {got} embedding rows, the base's {want}; " if got > want else ""
    raise OptionError(
        "{label}: {rows}it adds {count} token(s) the base lacks: {tokens}. Use experts fine-tuned with the "
        "base's tokenizer, or pass {allow_vocab_mismatch} to build with the base's vocabulary (the MoE then "
        "cannot produce them)",
        label=label,
        rows=rows,
        count=len(added),
        tokens=_describe(added),
    )
