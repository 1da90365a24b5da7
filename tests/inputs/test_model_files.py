"""Model files as a hostile source would write them: safetensors headers that break the format's rules,
indexes and configs with wrong types, LoRA configs with impossible values, and `verify` on outputs that are
not what they claim. Each is refused before any output is written: exit 1, one `error:` line naming the
file and what is wrong, and the work folder byte for byte as before."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from support.hostile import assert_refused, run_cli, split_safetensors, tree, write_safetensors
from support.tiny_models import write_recipe

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
UP1 = "model.layers.1.mlp.up_proj.weight"
GATE1 = "model.layers.1.mlp.gate_proj.weight"


def edit_header(file: Path, edit: Callable[[dict], object]) -> None:
    header, data = split_safetensors(file)
    write_safetensors(file, edit(header) or header, data)


def offsets_of(header: dict, name: str) -> list[int]:
    return header[name]["data_offsets"]


def shard(folder: Path, first: list[str] | None = None, duplicate: str | None = None, index: dict | None = None):
    """Split a folder's single file into two shards (`first` holds the named tensors, plus `duplicate`
    in both) with an index naming each tensor's shard (or `index` as given)."""
    tensors = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    names = sorted(tensors)
    first = first or names[: len(names) // 2]
    one = {n: tensors[n] for n in first}
    two = {n: tensors[n] for n in names if n not in first}
    if duplicate:
        one[duplicate], two[duplicate] = tensors[duplicate], tensors[duplicate]
    save_file(one, str(folder / "a.safetensors"))
    save_file(two, str(folder / "b.safetensors"))
    weight_map = {n: "a.safetensors" if n in first else "b.safetensors" for n in names}
    (folder / INDEX).write_text(json.dumps(index if index is not None else {"weight_map": weight_map}))
    return weight_map


def edit_json(file: Path, **changes) -> None:
    (file).write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# header edits of the expert's weights: (edit, parts of the error line)
def overlap(h):
    offsets_of(h, UP1)[:] = offsets_of(h, GATE1)  # same length: up_proj would silently read gate_proj's bytes


def negative(h):
    begin, end = offsets_of(h, UP1)
    offsets_of(h, UP1)[:] = [begin - 2**40, end - 2**40]


def gap(h):
    end = max(o[1] for o in (e["data_offsets"] for k, e in h.items() if k != "__metadata__"))
    h["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [end + 4, end + 8]}


def float_offsets(h):
    offsets_of(h, UP1)[:] = [float(o) for o in offsets_of(h, UP1)]


def string_offsets(h):
    offsets_of(h, UP1)[:] = [str(o) for o in offsets_of(h, UP1)]


def negative_dim(h):
    h[UP1]["shape"] = [-48, -32]


def bool_dim(h):
    h[UP1]["shape"] = [True, 48 * 32]


def metadata_number(h):
    h["__metadata__"] = {"format": 1}


def no_dtype(h):
    del h[UP1]["dtype"]


def string_shape(h):
    h[UP1]["shape"] = "48,32"


HEADER_CASES = {
    "overlap": (overlap, ("tensors", "overlap", "e1/model.safetensors")),
    "negative_offsets": (negative, (UP1, "negative or reversed")),
    "gap": (gap, ("unindexed bytes before tensor extra",)),
    "float_offsets": (float_offsets, (UP1, "not two whole numbers")),
    "string_offsets": (string_offsets, (UP1, "not two whole numbers")),
    "negative_dim": (negative_dim, (UP1, "not a list of whole numbers >= 0")),
    "bool_dim": (bool_dim, (UP1, "not a list of whole numbers")),
    "string_shape": (string_shape, (UP1, "not a list of whole numbers")),
    "metadata_number": (metadata_number, ("__metadata__ must map names to strings",)),
    "no_dtype": (no_dtype, (UP1, "needs dtype, shape and data_offsets")),
}


@pytest.mark.parametrize("name", HEADER_CASES)
def test_bad_safetensors_header_is_refused(work, name):
    edit, expect = HEADER_CASES[name]
    edit_header(work / "e1" / WEIGHTS, edit)
    recipe = write_recipe(work / "r.yaml", work / "base", [work / "e1", work / "lora"], gate_mode="random")
    before = tree(work)
    assert_refused(run_cli(recipe, work / "out"), *expect)
    assert tree(work) == before


def trailing_bytes(folder: Path):
    with (folder / WEIGHTS).open("ab") as handle:
        handle.write(b"\0" * 16)
    return ("16 bytes after the last tensor",)


def name_twice(folder: Path):
    header, data = split_safetensors(folder / WEIGHTS)
    text = json.dumps(header)
    entry = json.dumps(header[UP1])
    write_safetensors(folder / WEIGHTS, text[:-1] + f', "{UP1}": {entry}}}', data)
    return ("appears twice", UP1)


def in_two_shards(folder: Path):
    shard(folder, duplicate=UP1)
    return (f"tensor {UP1} is in both", "a.safetensors", "b.safetensors")


def in_the_other_shard(folder: Path):
    weight_map = shard(folder)
    wrong = "b.safetensors" if weight_map[UP1] == "a.safetensors" else "a.safetensors"
    (folder / INDEX).write_text(json.dumps({"weight_map": {**weight_map, UP1: wrong}}))
    return (INDEX, f"tensor {UP1} is in", f"lists it in {wrong}")


def listed_not_held(folder: Path):
    weight_map = shard(folder)
    (folder / INDEX).write_text(json.dumps({"weight_map": {**weight_map, "model.layers.0.ghost": "a.safetensors"}}))
    return (INDEX, "model.layers.0.ghost", "does not hold it")


def index_list(folder: Path):
    shard(folder, index=[])  # type: ignore[arg-type]
    return (INDEX, "not a JSON object")


def weight_map_empty(folder: Path):
    shard(folder, index={"weight_map": {}})
    return (INDEX, "weight_map")


def weight_map_list(folder: Path):
    shard(folder, index={"weight_map": []})
    return (INDEX, "weight_map", "dictionary")


def config_edit(**changes):
    def edit(folder: Path):
        edit_json(folder / "config.json", **changes)
        return ("e1/config.json", next(iter(changes)))

    edit.__name__ = "config_" + "_".join(changes)
    return edit


def lora_edit(**changes):
    def edit(folder: Path):
        edit_json(folder.parent / "lora" / "adapter_config.json", **changes)
        return ("lora/adapter_config.json", next(iter(changes)))

    edit.__name__ = "lora_" + "_".join(changes)
    return edit


FOLDER_CASES = [
    trailing_bytes,
    name_twice,
    in_two_shards,
    in_the_other_shard,
    listed_not_held,
    index_list,
    weight_map_empty,
    weight_map_list,
    config_edit(num_hidden_layers="two"),
    config_edit(hidden_size=None),
    config_edit(intermediate_size=[48]),
    config_edit(vocab_size=0),
    config_edit(num_attention_heads=2.5),
    config_edit(tie_word_embeddings="no"),
    lora_edit(r=0),
    lora_edit(r="8"),
    lora_edit(lora_alpha=None),
    lora_edit(rank_pattern={"up_proj": 0}),
    lora_edit(alpha_pattern={"(": 4}),
    lora_edit(use_rslora="yes"),
]


@pytest.mark.parametrize("edit", FOLDER_CASES, ids=lambda e: e.__name__)
def test_bad_model_folder_is_refused(work, edit):
    expect = edit(work / "e1")
    recipe = write_recipe(work / "r.yaml", work / "base", [work / "e1", work / "lora"], gate_mode="random")
    before = tree(work)
    assert_refused(run_cli(recipe, work / "out"), *expect)
    assert tree(work) == before


def test_architectures_as_a_string_says_so(work):
    edit_json(work / "base" / "config.json", architectures="LlamaForCausalLM")
    recipe = write_recipe(work / "r.yaml", work / "base", [work / "e1", work / "lora"], gate_mode="random")
    assert_refused(run_cli(recipe, work / "out"), "base/config.json: architectures: must be a list such as")


def test_lora_alpha_nan_is_refused(work):
    config = work / "lora" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    recipe = write_recipe(work / "r.yaml", work / "base", [work / "e1", work / "lora"], gate_mode="random")
    assert_refused(run_cli(recipe, work / "out"), "adapter_config.json: lora_alpha")


@pytest.fixture(scope="module")
def merged(masters, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merged")
    recipe = write_recipe(root / "r.yaml", masters / "base", [masters / "e1", masters / "lora"], gate_mode="random")
    assert run_cli(recipe, root / "out", "--shard-size", "20KB").rc == 0
    return root / "out"


def test_verify_on_a_dense_model_says_it_is_not_a_merged_output(masters):
    assert_refused(run_cli("verify", masters / "base"), "model_type 'llama' is not an MoE format", "merged output")


def test_verify_on_a_config_claiming_a_billion_experts_is_refused_at_once(merged, tmp_path):
    out = shutil.copytree(merged, tmp_path / "out")
    edit_json(out / "config.json", num_local_experts=10**9)
    assert_refused(run_cli("verify", out), "config.json", "experts need", "the index lists")


def test_verify_refuses_overlapping_tensors_in_a_shard(merged, tmp_path):
    out = shutil.copytree(merged, tmp_path / "out")
    first = sorted(out.glob("model-*.safetensors"))[0]

    def overlap_first_two(header: dict) -> None:
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        header[names[1]]["data_offsets"] = [o - 4 for o in header[names[1]]["data_offsets"]]

    edit_header(first, overlap_first_two)
    assert_refused(run_cli("verify", out), first.name, "overlap")
