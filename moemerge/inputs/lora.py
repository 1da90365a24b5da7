"""PEFT LoRA adapters: the delta `scale · B @ A` each adapted weight receives (transposed for an embedding),
and the whole weights an adapter saves (modules_to_save)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.inputs.families import MLP_PROJECTIONS
from moemerge.inputs.model_files import LoraConfig, typed
from moemerge.inputs.sources import TensorStore

log = logging.getLogger("moemerge")
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# An embedding's LoRA (PEFT's lora_embedding_A [r, vocab] and lora_embedding_B [hidden, r]): its delta is
# (B @ A) transposed, since nn.Embedding stores [vocab, hidden].
_EMBEDDING_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_embedding_([AB])(?:\.[^.]+)?")
# A whole weight the adapter saves (modules_to_save, such as lm_head, and an adapted embedding's own weight,
# which PEFT saves as base_layer): the expert's version replaces the base's.
_WHOLE_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)(?:\.base_layer|\.modules_to_save\.[^.]+)?\.weight")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module name or a dotted suffix of it (a regex)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


class LoraAdapter:
    """One adapter folder; deltas are computed per weight, on demand, in float32."""

    def __init__(self, path: Path, label: str, allow_pickle: bool = False) -> None:
        self.path = path
        self.label = label
        config_file = path / "adapter_config.json"
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise MoemergeError(f"{config_file}: unreadable adapter config ({exc.__class__.__name__})") from None
        self.config = typed(LoraConfig, raw, config_file)
        if self.config.peft_type != "LORA":
            peft_type = self.config.peft_type
            raise MoemergeError(f"{config_file}: peft_type {peft_type} is not supported; only LoRA adapters are")
        if self.config.use_dora:
            raise MoemergeError(f"{config_file}: DoRA adapters are not supported; merge them with PEFT first")
        self.weights = _adapter_weights(path, label, allow_pickle)
        self._embeddings: set[str] = set()  # modules whose pair is an embedding's (delta transposed)
        self._whole: dict[str, str] = {}  # weight name -> the adapter tensor that replaces it
        self._pairs = self._read_pairs()
        mlp = [m for m in self._pairs if m.rsplit(".", 1)[-1] in MLP_PROJECTIONS]
        if not mlp:
            raise MoemergeError(
                f"{label}: adapter {path} adapts no MLP weight (gate_proj/up_proj/down_proj); an expert's "
                "knowledge must live in its MLP"
            )
        self.ignored = sorted((set(self._pairs) - set(mlp)) | {w.removesuffix(".weight") for w in self._whole})
        if self.config.fan_in_fan_out:
            # The flag describes Conv1D layers stored [in, out] (GPT-2); the MLPs merged here are nn.Linear,
            # [out, in], for which PEFT resets it to false and applies B @ A as it is. So do we.
            log.warning(f"{label}: adapter sets fan_in_fan_out, which PEFT ignores for these nn.Linear MLPs; so do we")

    def _read_pairs(self) -> dict[str, tuple[str, str]]:
        pairs: dict[str, dict[str, str]] = {}
        for name in self.weights.names():
            match = _KEY.fullmatch(name) or _EMBEDDING_KEY.fullmatch(name)
            if match:
                pairs.setdefault(match.group(1), {})[match.group(2)] = name
                if match.re is _EMBEDDING_KEY:
                    self._embeddings.add(match.group(1))
            elif whole := _WHOLE_KEY.fullmatch(name):
                self._whole[f"{whole.group(1)}.weight"] = name
        for name in (n for p in (*pairs.values(), self._whole) for n in p.values()):
            if not self.weights.dtype(name).is_floating_point:
                dtype = self.weights.dtype(name)
                raise MoemergeError(f"{self.label}: adapter tensor {name} is {dtype}, not floating point")
        incomplete = [m for m, p in pairs.items() if len(p) != 2]
        if incomplete:
            raise MoemergeError(f"{self.label}: adapter {self.path} has lora_A without lora_B for {incomplete[0]}")
        if not pairs:
            raise MoemergeError(f"{self.label}: adapter {self.path} holds no lora_A/lora_B tensors")
        return {module: (p["A"], p["B"]) for module, p in pairs.items()}

    def scale(self, module: str) -> float:
        """alpha/r, or alpha/sqrt(r) for rsLoRA, with per-module rank and alpha patterns."""
        rank = _pattern_value(self.config.rank_pattern, module, self.config.r)
        alpha = _pattern_value(self.config.alpha_pattern, module, self.config.lora_alpha)
        return alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank

    def modules_beyond(self, num_layers: int) -> list[str]:
        """Adapted modules in layers the base does not have: a sign of an adapter for another model."""
        found = [re.search(r"layers\.(\d+)\.", module) for module in self._pairs]
        return [m.string for m in found if m and int(m.group(1)) >= num_layers]

    def adapts(self, weight_name: str) -> bool:
        return weight_name.removesuffix(".weight") in self._pairs or weight_name in self._whole

    def whole(self, weight_name: str) -> torch.Tensor | None:
        """The adapter's own copy of `weight_name` (modules_to_save; an adapted embedding's weight), which
        replaces the model's, or None."""
        return self.weights.load(self._whole[weight_name]) if weight_name in self._whole else None

    def check_shapes(self, shape_of: Callable[[str], tuple[int, ...]], mlp_only: bool = True) -> None:
        """Compare every adapted MLP weight's (every adapted weight's, unless `mlp_only`) delta shape with the
        model's, from headers alone."""
        for module in self._pairs:
            if mlp_only and module.rsplit(".", 1)[-1] not in MLP_PROJECTIONS:
                continue
            a_name, b_name = self._pairs[module]
            rows, cols = self.weights.shape(b_name)[0], self.weights.shape(a_name)[-1]
            if module in self._embeddings:
                rows, cols = cols, rows
            want = shape_of(f"{module}.weight")
            if (rows, cols) != tuple(want):
                raise MoemergeError(
                    f"{self.label}: adapter delta for {module}.weight is {[rows, cols]} but the model's weight is "
                    f"{list(want)}; was this adapter trained on another base model?"
                )
        for weight_name, name in ({} if mlp_only else self._whole).items():
            got, want = self.weights.shape(name), shape_of(weight_name)
            if tuple(got) != tuple(want):
                raise MoemergeError(
                    f"{self.label}: adapter tensor {name} is {list(got)} but the model's {weight_name} is "
                    f"{list(want)}, so non_expert_weights: average cannot take their mean; use non_expert_weights: "
                    "base"
                )

    def delta(self, weight_name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The float32 delta for the base weight `weight_name` of `shape`, or None if it is not adapted."""
        module = weight_name.removesuffix(".weight")
        if module not in self._pairs:
            return None
        a_name, b_name = self._pairs[module]
        lora_a = self.weights.load(a_name).float()
        lora_b = self.weights.load(b_name).float()
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise MoemergeError(f"{self.label}: adapter tensors {a_name} / {b_name} have incompatible shapes")
        delta = lora_b @ lora_a  # [out, in], as nn.Linear stores its weight (fan_in_fan_out: see __init__)
        if module in self._embeddings:
            delta = delta.T  # [vocab, hidden], as nn.Embedding stores its weight
        if tuple(delta.shape) != shape:
            raise MoemergeError(
                f"{self.label}: adapter delta for {weight_name} is {list(delta.shape)} but the model's weight is "
                f"{list(shape)}; was this adapter trained on another base model?"
            )
        return delta * self.scale(module)


def _adapter_weights(path: Path, label: str, allow_pickle: bool) -> TensorStore:
    """An adapter's tensors: safetensors preferred, a pickled .bin only when the user allowed it."""
    files = sorted(path.glob("adapter_model*.safetensors")) or sorted(path.glob("adapter_model*.bin"))
    if not files:
        raise MoemergeError(f"{label}: adapter {path} has no adapter_model.safetensors")
    return TensorStore(files, f"{label} (adapter {path})", allow_pickle)
