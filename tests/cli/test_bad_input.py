"""The `moemerge` command on bad input: one `error:` line that names the culprit, no traceback, no output folder.

Every case runs the real CLI entry point (`moemerge.cli:main`, what the `moemerge` console script calls) in a
process of its own, with its own stdout, stderr and exit status. Importing torch and transformers takes ~4 s of
CPU, so by default a small fork server imports moemerge once and forks a fresh child per case; the tests that
need a separate executable (--debug, setpriv, the positive --allow-pickle merge) exec the console script itself.
Set MOEMERGE_TEST_SPAWN=1 to exec the console script for every case (slower, same assertions).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.fork_server import ForkServer, Job, Result, spawn
from support.paths import CLI
from support.tiny_models import make_base, make_expert, make_lora, write_recipe

pytestmark = pytest.mark.slow  # runs the CLI on every hostile input

SPAWN_ALL = os.environ.get("MOEMERGE_TEST_SPAWN") == "1"
IS_ROOT = os.geteuid() == 0
SETPRIV = shutil.which("setpriv")


# ---------------------------------------------------------------------------------------------------------------
# running the CLI


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if SPAWN_ALL:
        yield None
        return
    forks = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield forks
    forks.close()


@pytest.fixture
def cli(server, background, tmp_path):
    """Run one case; asking for `background` starts the exec'd runs at the first case, to overlap them."""

    def run(*args, env: dict[str, str] | None = None) -> Result:
        args = [str(a) for a in args]
        if server is None:
            return spawn(args, tmp_path, env)
        return server.run(args, tmp_path, env or {})

    return run


# ---------------------------------------------------------------------------------------------------------------
# models and ways to break them


@dataclass
class Models:
    root: Path
    base: Path
    expert: Path
    lora: Path
    folders: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        return self.folders[name]


def copy_of(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_config(folder: Path, file: str = "config.json", **changes) -> None:
    config = json.loads((folder / file).read_text())
    config.update(changes)
    (folder / file).write_text(json.dumps(config))


def split_safetensors(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(file: Path, header: object, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(file: Path, edit: Callable[[dict], None]) -> None:
    header, data = split_safetensors(file)
    edit(header)
    write_safetensors(file, header, data)


def to_pickle(folder: Path, stem: str = "model") -> None:
    """Replace a folder's safetensors weights by a pickled torch .bin, as old checkpoints ship."""
    source = folder / f"{stem}.safetensors"
    torch.save(load_file(str(source)), folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))
    source.unlink()


UP1 = "model.layers.1.mlp.up_proj.weight"
DOWN2 = "model.layers.2.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory, server) -> Models:
    root = tmp_path_factory.mktemp("models")
    base = make_base(root / "base")
    m = Models(root, base, make_expert(base, root / "expert", seed=1), root / "lora")
    make_lora(base, m.lora, seed=2)
    f = m.folders

    def add(name: str, path: Path) -> Path:
        f[name] = path
        return path

    # configs we refuse
    edit_config(add("gpt2", copy_of(base, root / "gpt2")), architectures=["GPT2LMHeadModel"], model_type="gpt2")
    edit_config(add("attention_bias", copy_of(base, root / "attention bias")), attention_bias=True)
    (add("no_config", copy_of(base, root / "no config")) / "config.json").unlink()
    (add("bad_json", copy_of(base, root / "bad json")) / "config.json").write_text("{architectures: [")
    (add("no_weights", copy_of(base, root / "no weights")) / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (add("lost_shard", copy_of(base, root / "lost shard")) / "model.safetensors").unlink()
    (f["lost_shard"] / "model.safetensors.index.json").write_text(json.dumps(index))
    to_pickle(add("pickled", copy_of(base, root / "pickled")))
    to_pickle(add("pickled_expert", copy_of(m.expert, root / "pickled expert")))

    # experts that are other networks
    add("hidden_size", make_base(root / "hidden 64", hidden_size=64))
    add("intermediate_size", make_base(root / "intermediate 64", intermediate_size=64))
    add("num_layers", make_base(root / "five layers", num_hidden_layers=5))
    add("vocab_size", make_base(root / "vocab 80", vocab_size=80))

    # adapters that do not fit
    make_lora(f["hidden_size"], add("lora_other", root / "lora for hidden 64"), seed=3)
    make_lora(f["num_layers"], add("lora_deep", root / "lora for five layers"), seed=4)
    make_lora(base, add("lora_q", root / "lora q only"), seed=5, targets=("q_proj",))
    make_lora(base, add("lora_dora", root / "lora dora"), seed=6, use_dora=True)
    (add("lora_no_weights", copy_of(m.lora, root / "lora no weights")) / "adapter_model.safetensors").unlink()
    to_pickle(add("lora_pickled", copy_of(m.lora, root / "lora pickled")), stem="adapter_model")
    (add("lora_bad_config", copy_of(m.lora, root / "lora bad config")) / "adapter_config.json").write_text("{")

    # damaged weight files (of an expert, so the base stays sound)
    weights = "model.safetensors"
    raw = (m.expert / weights).read_bytes()
    (add("truncated", copy_of(m.expert, root / "truncated")) / weights).write_bytes(raw[: len(raw) // 2])
    (add("stub", copy_of(m.expert, root / "stub")) / weights).write_bytes(raw[:4])
    garbage = bytes((i * 7919 + 13) % 251 for i in range(4096))
    (add("garbage", copy_of(m.expert, root / "garbage")) / weights).write_bytes(garbage)
    length = struct.unpack("<Q", raw[:8])[0]
    garbled = raw[:8] + b"\xff\xfe" * (length // 2) + raw[8 + length :]
    (add("garbled_header", copy_of(m.expert, root / "garbled header")) / weights).write_bytes(garbled)
    _, data = split_safetensors(m.expert / weights)
    write_safetensors(add("list_header", copy_of(m.expert, root / "list header")) / weights, [], data)

    def lie_size(header: dict) -> None:  # a shape that needs more bytes than its offsets span
        header[UP1]["shape"] = [48, 33]

    def lie_shape(header: dict) -> None:  # same bytes, transposed shape: a valid file with a wrong tensor
        header[UP1]["shape"] = [32, 48]

    def unknown_dtype(header: dict) -> None:
        header[UP1]["dtype"] = "F8_E9M9"

    for name, edit in [("lying_size", lie_size), ("wrong_shape", lie_shape)]:
        edit_header(add(name, copy_of(m.expert, root / name.replace("_", " "))) / weights, edit)
    edit_header(add("unknown_dtype", copy_of(m.expert, root / "unknown dtype")) / weights, unknown_dtype)

    # a sound file that lacks a tensor (a header entry dropped with its bytes left in place is a corrupt file)
    tensors = load_file(str(m.expert / weights))
    save_file(
        {k: v for k, v in tensors.items() if k != DOWN2},
        str(add("missing_tensor", copy_of(m.expert, root / "missing tensor")) / weights),
    )

    # a sound file whose values are not: found only while the shards are being written
    tensors[DOWN2][0, 0] = float("nan")
    save_file(tensors, str(add("nan", copy_of(m.expert, root / "nan")) / weights))
    return m


# ---------------------------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    """args: the command line after `moemerge`; expect: substrings of the one error line."""

    args: list
    expect: tuple[str, ...]
    out: Path
    env: dict[str, str] = field(default_factory=dict)
    keep_out: bool = False  # OUT existed before: it must survive untouched


def recipe_with(work: Path, m: Models, base: Path | str | None = None, experts: list | None = None, **fields) -> Path:
    return write_recipe(work / "recipe.yaml", base or m.base, experts or [m.expert, m.lora], **fields)


def plain(work: Path, m: Models, base=None, experts=None, expect=(), **fields) -> Case:
    out = work / "out"
    return Case([recipe_with(work, m, base, experts, **fields), out], tuple(expect), out)


def c_missing_base(work, m):
    return plain(work, m, base=work / "no such model", expect=["base_model: ", "no such model", "not found"])


def c_base_is_file(work, m):
    return plain(work, m, base=m.base / "config.json", expect=["base_model: ", "config.json is a file"])


def c_recipe_missing(work, m):
    return Case([work / "nope.yaml", work / "out"], ("nope.yaml: recipe file not found",), work / "out")


def c_recipe_syntax(work, m):
    recipe = work / "recipe.yaml"
    recipe.write_text(f"base_model: {m.base}\nexperts:\n  - source_model: [oops\n  - source_model: x\n")
    return Case([recipe, work / "out"], ("recipe.yaml: line 4", "YAML syntax error"), work / "out")


def c_unknown_key(work, m):
    return plain(work, m, expect=["gateway_mode: unknown key; did you mean `gate_mode`?"], gateway_mode="hidden")


def c_expert_missing(work, m):
    return plain(work, m, experts=[m.expert, work / "ghost expert"], expect=["experts[1].source_model: ", "ghost"])


def c_plus_adapter_missing(work, m):
    return plain(work, m, experts=[m.expert, f"{m.base}+{work / 'ghost'}"], expect=["experts[1].source_model: adapter"])


def c_no_config(work, m):
    return plain(work, m, base=m["no_config"], expect=["base_model: ", "no config has no config.json"])


def c_bad_json(work, m):
    return plain(work, m, base=m["bad_json"], expect=["bad json/config.json: not valid JSON"])


def c_no_weights(work, m):
    return plain(work, m, base=m["no_weights"], expect=["base_model: ", "holds no .safetensors weights"])


def c_lost_shard(work, m):
    return plain(work, m, base=m["lost_shard"], expect=["model.safetensors.index.json: lists shard model-00001"])


def c_pickled_base(work, m):
    return plain(work, m, base=m["pickled"], experts=[m.expert, m.lora], expect=["base_model: ", "--allow-pickle"])


def c_pickled_expert(work, m):
    return plain(work, m, experts=[m["pickled_expert"], m.lora], expect=["experts[0].source_model: ", "--allow-pickle"])


def c_pickled_adapter(work, m):
    return plain(work, m, experts=[m.expert, m["lora_pickled"]], expect=["experts[1].source_model", "--allow-pickle"])


def c_gpt2(work, m):
    return plain(work, m, base=m["gpt2"], expect=["base_model: architecture GPT2LMHeadModel is not supported"])


def c_attention_bias(work, m):
    return plain(work, m, base=m["attention_bias"], expect=["base_model: attention_bias is true"])


def c_adapter_as_base(work, m):
    return plain(work, m, base=m.lora, expect=["base_model: ", "is a LoRA adapter"])


def shape_case(name: str, got: int, want: int):
    def case(work, m):
        return plain(
            work, m, experts=[m[name], m.lora], expect=[f"experts[0]: {name} is {got} but the base model's is {want}"]
        )

    case.__name__ = f"c_{name}"
    return case


def expert_case(name: str, *expect: str, index: int = 0):
    def case(work, m):
        experts = [m[name], m.lora] if index == 0 else [m.expert, m[name]]
        return plain(work, m, experts=experts, expect=expect)

    case.__name__ = f"c_{name}"
    return case


def c_out_exists(work, m):
    out = work / "existing"
    out.mkdir()
    (out / "marker.txt").write_text("keep me")
    return Case([recipe_with(work, m), out], (f"{out} already exists", "--force"), out, keep_out=True)


def c_out_is_file(work, m):
    out = work / "existing file"
    out.write_text("keep me")
    return Case([recipe_with(work, m), out, "--force"], (f"{out} exists and is a file",), out, keep_out=True)


def c_out_in_base(work, m):
    base = copy_of(m.base, work / "my base")
    out = base / "merged"
    expect = (f"{out} is inside or around the source model", "my base")
    return Case([recipe_with(work, m, base=base), out], expect, out)


def c_out_is_base_forced(work, m):
    base = copy_of(m.base, work / "my base")
    expect = (f"{base} is inside or around the source model",)
    return Case([recipe_with(work, m, base=base), base, "--force"], expect, base, keep_out=True)


def c_out_around_expert_forced(work, m):
    holder = work / "models"
    expert = copy_of(m.expert, holder / "my expert")
    expect = (f"{holder} is inside or around the source model",)
    return Case([recipe_with(work, m, experts=[expert, m.lora]), holder, "--force"], expect, holder, keep_out=True)


def c_out_under_a_file(work, m):
    """OUT's parent is a file. (As root, a chmod 0o555 parent is writable; see test_read_only_output_parent.)"""
    blocker = work / "a file"
    blocker.write_text("not a folder")
    return Case([recipe_with(work, m), blocker / "out"], (str(blocker),), blocker / "out")


def c_nan_weights(work, m):
    """Refused mid-write, with shards already on disk: the partial folder must go too."""
    made = plain(work, m, experts=[m["nan"], m.lora], expect=["NaN or Inf values", f"experts[0] {DOWN2}"])
    made.args += ["--shard-size", "2KB"]
    return made


def c_device_cuda(work, m):
    case = plain(work, m, expect=["--device cuda: no CUDA device"])
    case.args += ["--device", "cuda"]
    case.env = {"CUDA_VISIBLE_DEVICES": ""}
    return case


def option_case(name: str, options: list[str], *expect: str):
    def case(work, m):
        made = plain(work, m, expect=expect)
        made.args += options
        return made

    case.__name__ = f"c_{name}"
    return case


def c_missing_out_argument(work, m):
    return Case([recipe_with(work, m)], ("Missing argument", "out"), work / "out")


CASES = [
    c_missing_base,
    c_base_is_file,
    c_recipe_missing,
    c_recipe_syntax,
    c_unknown_key,
    c_expert_missing,
    c_plus_adapter_missing,
    c_no_config,
    c_bad_json,
    c_no_weights,
    c_lost_shard,
    c_pickled_base,
    c_pickled_expert,
    c_pickled_adapter,
    c_gpt2,
    c_attention_bias,
    c_adapter_as_base,
    shape_case("hidden_size", 64, 32),
    shape_case("intermediate_size", 64, 48),
    shape_case("num_layers", 5, 3),
    expert_case(
        "vocab_size",
        "experts[0]: its vocabulary has 80 embedding rows, the base's 64; it adds 16 token(s) the base lacks: id 64,",
        "pass --allow-vocab-mismatch",
    ),
    expert_case(
        "lora_other",
        "experts[1].source_model: adapter delta for model.layers.0.mlp.down_proj.weight is [64, 48]",
        "[32, 48]",
        index=1,
    ),
    expert_case("lora_deep", "experts[1]: adapter adapts model.layers.3.", "beyond the base's 3 layers", index=1),
    expert_case("lora_q", "experts[1].source_model: adapter ", "lora q only adapts no MLP weight", index=1),
    expert_case("lora_dora", "lora dora/adapter_config.json: DoRA adapters are not supported", index=1),
    expert_case("lora_no_weights", "experts[1].source_model: ", "has no adapter_model.safetensors", index=1),
    expert_case("lora_bad_config", "lora bad config/adapter_config.json: unreadable adapter config", index=1),
    expert_case("truncated", "truncated/model.safetensors: tensor ", "lies past the end of the file"),
    expert_case("stub", "stub/model.safetensors: truncated safetensors file (no header)"),
    expert_case("garbage", "garbage/model.safetensors: corrupt safetensors header (length"),
    expert_case("garbled_header", "garbled header/model.safetensors: corrupt safetensors header (not JSON)"),
    expert_case("list_header", "list header/model.safetensors: corrupt safetensors header (not a JSON object)"),
    expert_case("lying_size", f"lying size/model.safetensors: tensor {UP1}: header says 6144 bytes", "needs 6336"),
    expert_case("unknown_dtype", f"unknown dtype/model.safetensors: tensor {UP1}: unreadable or unsupported"),
    expert_case("wrong_shape", f"experts[0]: tensor {UP1} is [32, 48] but the base's is [48, 32]"),
    expert_case("missing_tensor", f"experts[0].source_model: tensor {DOWN2} is missing"),
    c_nan_weights,
    c_out_exists,
    c_out_is_file,
    c_out_in_base,
    c_out_is_base_forced,
    c_out_around_expert_forced,
    c_out_under_a_file,
    c_device_cuda,
    option_case("device_tpu", ["--device", "tpu"], "--device 'tpu': use auto, cpu or cuda"),
    option_case("shard_size_abc", ["--shard-size", "abc"], "--shard-size 'abc': use a size such as 5GB"),
    option_case("shard_size_zero", ["--shard-size", "0MB"], "--shard-size '0MB': must be positive"),
    option_case("dtype_int8", ["--dtype", "int8"], "dtype 'int8' is not supported"),
    option_case("unknown_option", ["--bogus"], "No such option: --bogus"),
    option_case("seed_abc", ["--seed", "abc"], "'--seed'"),
    c_missing_out_argument,
    option_case("batch_size_zero", ["--batch-size", "0"], "--batch-size"),
    option_case("batch_size_negative", ["--batch-size", "-1"], "--batch-size"),
]


def _id(case) -> str:
    return case.__name__.removeprefix("c_")


def snapshot(folder: Path) -> dict[str, bytes]:
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def leftovers(out: Path) -> list[Path]:
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.moemerge-*"))


def check_refused(result: Result, case: Case, before: dict[str, bytes] | None) -> str:
    """The invariants every refusal shares; returns the error line."""
    assert result.rc != 0, f"exit 0 on bad input; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for part in case.expect:
        assert part in line, f"{part!r} not in {line!r}"
    assert result.stdout.strip() == "", result.stdout
    if case.keep_out:
        assert snapshot(case.out) == before, f"{case.out} was changed"
    else:
        assert not case.out.exists(), f"{case.out} was created"
    assert leftovers(case.out) == [], leftovers(case.out)
    return line


@pytest.mark.parametrize("make_case", CASES, ids=_id)
def test_bad_input_is_refused_in_one_line(cli, models, tmp_path, make_case):
    case = make_case(tmp_path, models)
    before = snapshot(case.out) if case.keep_out else None
    result = cli(*case.args, env=case.env)
    check_refused(result, case, before)


# ---------------------------------------------------------------------------------------------------------------
# the same input, allowed or forced, works; --debug shows the traceback; a read-only parent


@dataclass
class Background:
    work: Path
    jobs: dict[str, Job]
    read_only: Path
    skip_read_only: str = ""


@pytest.fixture(scope="module")
def background(models, tmp_path_factory):
    """The tests that need the console script itself exec'd (--debug, setpriv), started together."""
    work = tmp_path_factory.mktemp("exec")
    jobs: dict[str, Job] = {}

    debug = work / "debug"
    debug.mkdir()
    recipe = recipe_with(debug, models, base=debug / "no such model")
    jobs["debug"] = Job(["--debug", recipe, debug / "out"], debug)

    # chmod 0o555 does not stop root (CAP_DAC_OVERRIDE): as root the CLI runs under setpriv without it.
    read_only = work / "read only"
    read_only.mkdir()
    state = Background(work, jobs, read_only)
    prefix: list[str] = []
    if IS_ROOT and SETPRIV is None:
        state.skip_read_only = "running as root without setpriv: a read-only folder is writable to us"
    elif IS_ROOT:
        prefix = [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", "--"]
    if not state.skip_read_only:
        recipe = recipe_with(work, models)
        read_only.chmod(0o555)
        jobs["read_only"] = Job([recipe, read_only / "out"], work, prefix=prefix)
    yield state
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()
        job.proc.communicate()
    read_only.chmod(0o755)


def test_allow_pickle_merges_a_pickled_base(cli, models, tmp_path):
    recipe = recipe_with(tmp_path, models, base=models["pickled"], experts=[models["pickled_expert"], models.lora])
    out = tmp_path / "out"
    result = cli(recipe, out, "--allow-pickle", "--device", "cpu")
    assert result.rc == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "wrote" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 2
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(str(shard)))
    dense = load_file(str(models.base / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(written[name], dense[name], rtol=0, atol=0)
    expert = load_file(str(models.expert / "model.safetensors"))
    torch.testing.assert_close(
        written["model.layers.1.block_sparse_moe.experts.0.w3.weight"], expert[UP1], rtol=0, atol=0
    )
    assert leftovers(out) == []


def test_debug_shows_the_traceback(background):
    result = background.jobs["debug"].result()
    assert result.rc != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "MoemergeError" in result.stderr
    assert "no such model" in " ".join(result.stderr.split())  # --debug output may be wrapped
    assert not (background.work / "debug" / "out").exists()


def test_read_only_output_parent(background):
    assert not background.skip_read_only, background.skip_read_only  # install util-linux (setpriv) to run it
    parent = background.read_only
    result = background.jobs["read_only"].result()
    out = parent / "out"
    check_refused(result, Case([], (f"{parent} is not writable",), out), None)
    assert list(parent.iterdir()) == []


def test_force_replaces_an_existing_output(cli, models, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "marker.txt").write_text("replace me")
    result = cli(recipe_with(tmp_path, models, gate_mode="random"), out, "--force", "--device", "cpu")
    assert result.rc == 0, result.stderr
    assert not (out / "marker.txt").exists()
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors.index.json").is_file()
    assert leftovers(out) == []


def test_index_naming_a_file_outside_the_model_is_refused(tmp_path):
    """An index is data from the internet: a shard name must be a plain file name inside the model folder."""
    base = make_base(tmp_path / "base")
    secret = tmp_path / "secret.safetensors"
    (base / "model.safetensors").rename(secret)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    recipe = write_recipe(tmp_path / "r.yaml", base, [base, base], gate_mode="random")
    run = subprocess.run(
        [CLI, str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "points outside the model folder" in run.stderr
    assert not (tmp_path / "out").exists()
