"""Expert MLP tensors: a fine-tuned model's own, or the base's plus a LoRA delta; then noise and residual scale."""

from __future__ import annotations

from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.inputs.families import MLP_PROJECTIONS, mlp_tensor, stored_name
from moemerge.inputs.lora import LoraAdapter
from moemerge.inputs.recipe import ExpertSpec
from moemerge.inputs.safetensors_header import TensorInfo
from moemerge.inputs.sources import ModelSource


class Expert:
    """Produces one expert's MLP weights, one tensor at a time, in the output dtype."""

    def __init__(
        self,
        index: int,
        spec: ExpertSpec,
        model: ModelSource,
        adapter: LoraAdapter | None,
        seed: int,
        label: str | None = None,
        down_scale: float = 1.0,
    ) -> None:
        self.index = index
        self.spec = spec
        self.model = model
        self.adapter = adapter
        self.seed = seed
        self.label = label or f"experts[{index}]"
        self.down_scale = down_scale  # below 1 where the output format mixes experts with a shared expert

    def check(self, base: ModelSource, num_layers: int, all_adapted: bool = False) -> None:
        """Every MLP weight must exist with the base's shape; the message names the tensor that does not.
        With `all_adapted` (non_expert_weights: average), every weight the adapter adapts is checked too."""
        for layer in range(num_layers):
            for projection in MLP_PROJECTIONS:
                name = mlp_tensor(layer, projection)
                want, got = base.tensors.shape(name), self.model.tensors.shape(name)
                if want != got:
                    raise MoemergeError(f"{self.label}: tensor {name} is {list(got)} but the base's is {list(want)}")
        if self.adapter is not None:
            for module in self.adapter.modules_beyond(num_layers):
                raise MoemergeError(f"{self.label}: adapter adapts {module}, beyond the base's {num_layers} layers")
            self.adapter.check_shapes(self.model.tensors.shape, mlp_only=not all_adapted)

    def tokenizer_folder(self) -> Path:
        """Where the tokenizer the expert was trained with lives: its adapter's folder when the adapter ships
        one (fine-tunes that add tokens save it there), else its model's."""
        if self.adapter and any(
            (self.adapter.path / name).is_file() for name in ("tokenizer.json", "added_tokens.json")
        ):
            return self.adapter.path
        return self.model.path

    def may_differ(self, name: str, base: ModelSource) -> bool:
        """Whether this expert's own version of a non-expert weight can differ from the base's: always for a
        model of its own, only where its adapter adapts it for an adapter on the base."""
        return self.model is not base or (self.adapter is not None and self.adapter.adapts(name))

    def own_weight(self, name: str) -> torch.Tensor:
        """This expert's own version of any weight, float32, without noise or residual scale: its model's (the
        embeddings for the lm_head of a tied model) or the whole weight its adapter saves (modules_to_save),
        plus its adapter's delta where the adapter adapts it."""
        whole = self.adapter.whole(name) if self.adapter else None
        weight = (whole if whole is not None else self.model.tensors.load(stored_name(self.model, name))).float()
        delta = self.adapter.delta(name, tuple(weight.shape)) if self.adapter else None
        return weight if delta is None else weight + delta

    def _noise_seed(self, layer: int, projection: int) -> int:
        # One seed per tensor, so the noise does not depend on the order tensors are written in.
        return (self.seed * 1_000_003 + self.index * 10_007 + layer * 31 + projection) % (2**63)

    def _residual(self, projection: str) -> float:
        """What this projection is multiplied by: the recipe's residual_scale and the format's down_scale,
        for down projections only."""
        if projection != "down_proj":
            return 1.0
        return (1.0 if self.spec.residual_scale is None else self.spec.residual_scale) * self.down_scale

    def source_bytes(self, layer: int, projection: str, dtype: torch.dtype) -> TensorInfo | None:
        """The file range holding this tensor's output bytes as they are: the model's own weight, already in
        `dtype`, with no adapter, noise or residual scale (None otherwise, and then `tensor` computes it)."""
        if self.adapter is not None or self.spec.noise_scale or self._residual(projection) != 1.0:
            return None
        return self.model.tensors.byte_range(mlp_tensor(layer, projection), dtype)

    def tensor(self, layer: int, projection: str) -> torch.Tensor:
        """The expert's weight, in its source dtype or float32 once changed: the writer casts it to the
        output dtype, and so can tell an overflow in that cast from non-finite source values."""
        name = mlp_tensor(layer, projection)
        weight = self.model.tensors.load(name)
        delta = self.adapter.delta(name, tuple(weight.shape)) if self.adapter else None
        noise, residual = self.spec.noise_scale, self._residual(projection)
        if delta is None and not noise and residual == 1.0:
            return weight
        work = weight.float()
        if delta is not None:
            work += delta
        if noise:
            generator = torch.Generator().manual_seed(self._noise_seed(layer, MLP_PROJECTIONS.index(projection)))
            work += torch.randn(work.shape, generator=generator) * noise
        if residual != 1.0:
            work *= residual
        return work
