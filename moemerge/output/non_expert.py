"""The non-expert weights: everything the experts share (attention, norms, embeddings, lm_head, and the MLP
of a layer kept dense), by the recipe's `non_expert_weights` policy.

- `base` (the default, mergekit-moe's behaviour): the base's tensor as it is.
- `average` (Branch-Train-MiX): the mean over the routed experts of each expert's own version of the
  tensor. A full fine-tune's version is its own weight; a LoRA expert's is the base's weight plus its
  adapter's delta where the adapter adapts it (q/k/v/o, say), else the base's weight. So for adapters
  alone the result is the base plus the mean of the deltas (not their sum, which measured worse: the
  deltas were trained one at a time, not to be added up). The shared expert is not an expert of the mean.

The mean is summed in float64, exact for any dtype we read, and rounded once: N identical experts give
their tensor back bit for bit. A tensor no expert changes is copied from the base file as it is. Each
output tensor is computed from its sources one at a time, like every other tensor of the plan, so memory
stays flat.
"""

from __future__ import annotations

import torch

from moemerge.errors import MoemergeError
from moemerge.inputs.experts import Expert
from moemerge.inputs.families import stored_name
from moemerge.inputs.sources import ModelSource
from moemerge.output.writer import PlannedTensor


def _copy(base: ModelSource, name: str, dtype: torch.dtype, out_name: str) -> PlannedTensor:
    source = stored_name(base, name)
    return PlannedTensor(
        out_name,
        base.tensors.shape(source),
        dtype,
        lambda: base.tensors.load(source).to(dtype),
        f"base {source}",
        base.tensors.byte_range(source, dtype),
    )


def _check_shape(expert: Expert, name: str, want: tuple[int, ...]) -> None:
    source = stored_name(expert.model, name)
    got = expert.model.tensors.shape(source)
    if got != want:
        raise MoemergeError(
            f"{expert.label}: tensor {source} is {list(got)} but the base's is {list(want)}, so "
            "non_expert_weights: average cannot take their mean; use non_expert_weights: base"
        )


def non_expert_tensor(
    policy: str,
    base: ModelSource,
    experts: list[Expert],
    name: str,
    dtype: torch.dtype,
    out_name: str | None = None,
) -> PlannedTensor:
    """The output tensor `out_name` (default `name`) for the shared weight `name`, planned by `policy`;
    a shape an expert does not share with the base is refused now, before anything is written."""
    out_name = out_name or name
    changing = [expert for expert in experts if expert.may_differ(name, base)] if policy == "average" else []
    if not changing:
        return _copy(base, name, dtype, out_name)
    shape = base.tensors.shape(stored_name(base, name))
    for expert in changing:
        _check_shape(expert, name, shape)
    unchanged = len(experts) - len(changing)

    def produce() -> torch.Tensor:
        total = base.tensors.load(stored_name(base, name)).double() * unchanged if unchanged else None
        for expert in changing:
            own = expert.own_weight(name).double()
            total = own if total is None else total.add_(own)
            del own
        return total.div_(len(experts)).to(dtype)

    labels = ", ".join(expert.label for expert in changing)
    return PlannedTensor(out_name, shape, dtype, produce, f"mean of {name} over the experts ({labels} changed)")
