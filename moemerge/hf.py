"""Loading models and tokenizers with transformers: imported only when needed (it costs seconds and
hundreds of MB, which a merge with random gates never needs), never with remote code, and without
transformers' own progress bars, which would fight with ours."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def quiet() -> None:
    """No transformers progress bars: ours are the ones shown."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_model(path: Path, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """A causal LM from a local folder, in eval mode, on the CPU in one piece (no device map: the gates'
    router inputs are captured layer by layer instead, moemerge.gates.layer_stream)."""
    from transformers import AutoModelForCausalLM

    quiet()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    return model.eval()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; a missing or corrupt one is one line (transformers raises many kinds)."""
    from transformers import AutoTokenizer

    from moemerge.errors import MoemergeError

    quiet()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, the tokenizers library's own exceptions
        reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
        raise MoemergeError(f"{path}: its tokenizer cannot be loaded ({reason}); the gates need it") from None
