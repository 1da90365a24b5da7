"""The switches of a merge, shared by the CLI and the Python API, checked when they are made."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as validated_dataclass

from moemerge.inputs.recipe import MAX_SEED


@validated_dataclass(config=ConfigDict(strict=True))
class MergeOptions:
    """Command-line switches, the same for the CLI and the Python API; ranges are checked on creation (a
    pydantic ValidationError; the CLI turns it into a one-line error naming the option)."""

    device: str = "auto"
    dtype: str | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    shard_size: Annotated[int, Field(gt=0)] = 5_000_000_000
    force: bool = False
    allow_pickle: bool = False
    allow_vocab_mismatch: bool = False  # build with the base's vocabulary when experts added tokens
    batch_size: Annotated[int, Field(ge=1)] = 256
    hub_repo_id: str | None = None  # the Hub repo the output is meant for: named in the model card (cli pushes)
