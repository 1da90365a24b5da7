"""The JSON files of a model folder, typed: config.json, the shard index, a LoRA adapter's config.

Each is data from the internet. A value of the wrong type (`num_hidden_layers: "two"`, `r: "8"`, a
`weight_map` that is a list) is named in one line with its key and file when the folder is opened, before
any output is written, instead of surfacing later as a crash somewhere in the merge.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from moemerge.errors import MoemergeError
from moemerge.files import check_object

Size = Annotated[StrictInt, Field(ge=1)]
COPIED_NOT_NULL = ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act")
Number = StrictInt | StrictFloat
Model = TypeVar("Model", bound=BaseModel)


class RopeScaling(BaseModel):
    """rope_scaling / rope_parameters: copied into the MoE's config.json, so typed as readers expect them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    rope_type: str | None = None
    type: str | None = None
    factor: Annotated[Number, Field(gt=0)] | None = None
    rope_theta: Annotated[Number, Field(gt=0)] | None = None


class DenseConfig(BaseModel):
    """The keys of a dense model's config.json that the merge reads; others pass through untouched."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    architectures: Annotated[list[str], Field(min_length=1)] | None = None
    model_type: str | None = None
    num_hidden_layers: Size
    hidden_size: Size
    intermediate_size: Size
    num_attention_heads: Size
    vocab_size: Size
    num_key_value_heads: Size | None = None
    head_dim: Size | None = None
    max_position_embeddings: Size | None = None
    sliding_window: Size | None = None
    hidden_act: str | None = None
    tie_word_embeddings: StrictBool | None = None
    attention_bias: StrictBool | None = None
    mlp_bias: StrictBool | None = None
    use_sliding_window: StrictBool | None = None
    rms_norm_eps: Annotated[Number, Field(gt=0)] | None = None
    rope_theta: Annotated[Number, Field(gt=0)] | None = None
    rope_scaling: RopeScaling | None = None
    rope_parameters: RopeScaling | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_null_copied_values(cls, data: Any) -> Any:
        """Keys the MoE's config.json copies: null there is absent to us but breaks every reader of the output."""
        for key in COPIED_NOT_NULL:
            if isinstance(data, dict) and key in data and data[key] is None:
                raise ValueError(f"{key} is null; give its value or remove the key")
        return data

    @field_validator("architectures", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f'must be a list such as ["{value}"], not a string')
        return value


class ShardIndex(BaseModel):
    """model.safetensors.index.json: which shard file holds each tensor."""

    model_config = ConfigDict(extra="allow")

    weight_map: Annotated[dict[str, str], Field(min_length=1)]


class LoraConfig(BaseModel):
    """adapter_config.json: the keys that set a LoRA delta's scale and layout (PEFT's defaults)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    peft_type: str = "LORA"
    r: Size = 8
    lora_alpha: Number = 8
    use_rslora: StrictBool = False
    use_dora: StrictBool = False
    fan_in_fan_out: StrictBool = False
    rank_pattern: dict[str, Size] = {}
    alpha_pattern: dict[str, Number] = {}

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if value is None:
            return {}
        for pattern in value if isinstance(value, dict) else ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid pattern ({exc})") from None
        return value


def typed(model: type[Model], data: Any, where: str | Path) -> Model:
    """`data` checked against `model`; the first problem as one line: file, key, what is wrong, the value."""
    check_object(data, where)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "missing":
            raise MoemergeError(f"{where}: missing key {key}") from None
        message = error["msg"].removeprefix("Value error, ")
        shown = json.dumps(error["input"], default=repr, ensure_ascii=True)[:60]
        raise MoemergeError(f"{where}: {key}: {message} (got {shown})") from None
