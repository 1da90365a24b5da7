"""The recipe: a mergekit-moe compatible YAML file, validated before any tensor is touched."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moemerge.errors import MoemergeError
from moemerge.inputs.gate_modes import DEFAULT_GATE_MODE, GATE_MODE_SPECS, Needs, mode_list

NonExpertPolicy = Literal["base", "average"]  # where attention, norms, embeddings and dense MLPs come from
# The output formats `architecture:` may name (moemerge.formats writes each), and mergekit-moe's spellings of
# them, so its recipes read unchanged.
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURE_ALIASES = {"qwen": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
DTYPE_ADVICE = "use bfloat16, float16 or float32"  # what every refused dtype is told
# Keys that belong to later features or other tools: refused with a reason instead of a spelling hint.
EXPLAINED_KEYS = {
    "merge_method": "merge_method belongs to mergekit-yaml merges, not to MoE recipes; remove it",
    "models": "`models` is a mergekit-yaml key; an MoE recipe lists `experts` with `source_model` each",
}


def _as_list(value: Any) -> Any:
    """Published recipes write a bare string or nothing where a list belongs; both mean the obvious list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


# Numbers are finite (no .inf/.nan) and within ranges that keep float32 arithmetic finite: a recipe value
# is refused here, by key, rather than surfacing as NaN in a tensor once writing has started.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
MAX_SEED = 2**63 - 1  # torch generators take 64 bits; the per-tensor noise seeds are taken modulo 2**63
MAX_SCALE = 1e4  # gate_scale, residual_scale, noise_scale: far beyond any useful value, far below overflow


class ExpertSpec(BaseModel):
    """One expert: a fine-tuned model or a LoRA adapter, and prompts saying what it is good at."""

    model_config = STRICT

    source_model: str = Field(min_length=1)
    name: str | None = None
    positive_prompts: list[str] = []
    negative_prompts: list[str] = []
    positive_prompts_file: str | None = None
    negative_prompts_file: str | None = None
    noise_scale: float | None = Field(default=None, ge=0, le=MAX_SCALE)
    residual_scale: float | None = Field(default=None, ge=-MAX_SCALE, le=MAX_SCALE)

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _prompts_as_list(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("source_model", mode="before")
    @classmethod
    def _path_as_string(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


class TrainingSpec(BaseModel):
    """How `trained` gates are fitted: full-batch AdamW on frozen router inputs, per layer."""

    model_config = STRICT

    steps: int = Field(default=300, ge=1, le=1_000_000)
    lr: float = Field(default=0.01, gt=0, le=10)
    weight_decay: float = Field(default=0.01, ge=0, le=10)
    batch_size: int = Field(default=256, ge=1)  # most prompts per forward pass (router_inputs.BATCH_TOKENS caps tokens)
    max_tokens: int = Field(default=256, ge=4)
    holdout: float = Field(default=0.2, ge=0, lt=1)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    layers: list[Annotated[int, Field(ge=0)]] | None = None
    tune_on_moe: bool = False  # refit every router on the merged MoE's own router inputs (output/on_moe.py)

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        if value == []:
            raise ValueError("names no layer; list the layers to train, e.g. [8, 9, 10], or leave it out to train all")
        repeated = sorted({layer for layer in value or () if value.count(layer) > 1})
        if repeated:
            raise ValueError(f"lists layer {repeated[0]} more than once; list each layer once, e.g. [8, 9, 10]")
        return value


class GenerateSpec(BaseModel):
    """How `generated` gates' experts write their labelled texts (moemerge.gates.expert_texts); the defaults
    were measured on the SmolLM2 demo (benchmarks/generated_defaults.py)."""

    model_config = STRICT

    continuations: int = Field(default=4, ge=1, le=10_000)  # per positive prompt
    unprompted: int = Field(default=8, ge=0, le=10_000)  # per expert, from no prompt (expert_texts.UNPROMPTED)
    max_new_tokens: int = Field(default=64, ge=1, le=8192)
    temperature: float = Field(default=0.7, gt=0, le=100)
    top_p: float = Field(default=0.95, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # None: the merge's seed (--seed)


class Recipe(BaseModel):
    """A whole merge: base model, experts, and how the routers are set."""

    model_config = STRICT

    base_model: str = Field(min_length=1)
    experts: list[ExpertSpec] = Field(min_length=2)
    gate_mode: str = DEFAULT_GATE_MODE  # a name in moemerge.inputs.gate_modes
    dtype: str | None = None
    experts_per_token: int = Field(default=2, ge=1, strict=True)
    gate_scale: float = Field(default=30.0, gt=0, le=MAX_SCALE)  # measured: benchmarks/routing_quality.py
    dataset_csv: str | None = None
    training: TrainingSpec = TrainingSpec()
    generate: GenerateSpec = GenerateSpec()
    architecture: str | None = None  # output format; None: the base family's default (see moemerge.formats)
    shared_experts: list[ExpertSpec] = Field(default=[], max_length=1)
    # moemerge's own keys (mergekit-moe has none; their defaults build what mergekit-moe builds):
    non_expert_weights: NonExpertPolicy = "base"  # see moemerge/output/non_expert.py
    moe_layers: list[int] | None = Field(default=None, min_length=1)  # None: every layer; others stay dense

    @field_validator("moe_layers")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if min(value) < 0 or len(set(value)) != len(value):
            raise ValueError("list each layer once, as a number from 0; e.g. moe_layers: [8, 9, 10]")
        return sorted(value)

    @field_validator("architecture", mode="before")
    @classmethod
    def _known_architecture(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        key = value.strip().lower()
        key = ARCHITECTURE_ALIASES.get(key, key)
        if key not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; moemerge writes {', '.join(ARCHITECTURES)}")
        return key

    @field_validator("gate_mode", mode="before")
    @classmethod
    def _known_gate_mode(cls, value: Any) -> Any:
        if not isinstance(value, str) or value not in GATE_MODE_SPECS:
            raise ValueError(f"unknown gate mode {value!r}; use {mode_list()}")
        return value

    @field_validator("shared_experts", mode="before")
    @classmethod
    def _shared_as_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, value: Any) -> Any:
        if value is None:
            return None
        key = str(value).lower().removeprefix("torch.")
        if key not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {value!r}; {DTYPE_ADVICE}")
        return DTYPE_ALIASES[key]

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_as_string(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"experts_per_token is {self.experts_per_token} but the recipe has only "
                f"{len(self.experts)} experts; lower experts_per_token"
            )
        mode = GATE_MODE_SPECS[self.gate_mode]
        if mode.needs is Needs.DATASET and not self.dataset_csv:
            raise ValueError(f"gate_mode {self.gate_mode} needs dataset_csv: a CSV of prompt,expert rows to train on")
        if mode.needs_prompts and not self.dataset_csv:
            for i, expert in enumerate(self.experts):
                negatives = [p for p in expert.negative_prompts if p.strip()] or expert.negative_prompts_file
                positives = [p for p in expert.positive_prompts if p.strip()] or expert.positive_prompts_file
                if not positives and not negatives:  # negatives alone describe an expert by what it is not
                    raise ValueError(
                        f"experts[{i}].positive_prompts is empty, but gate_mode {self.gate_mode} builds each "
                        "router from its expert's prompts; add prompts or use gate_mode: random"
                    )
            seen: dict[tuple[str, ...], int] = {}
            for i, expert in enumerate(self.experts):
                key = (
                    tuple(sorted({p.strip() for p in expert.positive_prompts} - {""})),
                    tuple(sorted({p.strip() for p in expert.negative_prompts} - {""})),
                    expert.positive_prompts_file,
                    expert.negative_prompts_file,
                )
                if key in seen:
                    raise ValueError(
                        f"experts[{seen[key]}] and experts[{i}] have identical prompts, so their routers would "
                        "be identical; give each expert prompts of its own"
                    )
                seen[key] = i
        return self

    def expert_names(self) -> list[str]:
        """Names for reports: the recipe's `name`, else the source's folder name, made unique."""
        names: list[str] = []
        for i, expert in enumerate(self.experts):
            name = expert.name or Path(expert.source_model.split("+")[-1].rstrip("/")).name or f"expert{i}"
            unique, suffix = name, i
            while unique in names:
                unique, suffix = f"{name}-{suffix}", suffix + 1
            names.append(unique)
        return names


def _key_path(loc: tuple[Any, ...]) -> str:
    """('experts', 2, 'source_model') -> 'experts[2].source_model', the way users read their YAML."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part).encode("unicode_escape").decode("ascii")  # a key with a newline stays on one line
            out += f".{text}" if out else text
    return out


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    sections = {"training": TrainingSpec, "generate": GenerateSpec}
    section = next((sections[key] for key in loc if key in sections), Recipe)
    model = ExpertSpec if {"experts", "shared_experts"} & set(loc) else section
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = _key_path(loc)
    if error["type"] == "extra_forbidden":
        key = str(loc[-1])
        if key in EXPLAINED_KEYS:
            return f"{path}: {EXPLAINED_KEYS[key]}"
        close = difflib.get_close_matches(key, _valid_keys(loc[:-1]), n=1, cutoff=0.5)
        hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(_valid_keys(loc[:-1]))}"
        return f"{path}: unknown key{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "too_long" and loc[-1] == "shared_experts":
        message = "at most one shared expert: moemerge writes one beside the routed experts of each layer"
    return f"{path}: {message}" if path else message


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate already-parsed YAML; every problem is reported with its key path."""
    if not isinstance(data, dict):
        raise MoemergeError(f"{source}: the recipe must be a YAML mapping with base_model and experts")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise MoemergeError(f"{source}: {_describe(first)}{more}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings name each key once: with a key twice, PyYAML keeps the last value silently, and
    the recipe would not mean what its author reads. Keys merged in from an anchor (`<<: *x`) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # an unhashable key: the constructor below says what is wrong with it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; YAML anchors and indentless lists are plain YAML and just work."""
    path = Path(path)
    if not path.is_file():
        raise MoemergeError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise MoemergeError(f"{path}: not a text file; a recipe is UTF-8 YAML") from None
    except RecursionError:
        raise MoemergeError(f"{path}: the YAML is nested too deeply to be a recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MoemergeError(f"{path}:{where}: YAML syntax error: {problem}") from None
    return parse_recipe(data, str(path))
