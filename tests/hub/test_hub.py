"""Hub ids in recipes, pushing outputs, and the model card — against a local stand-in for the Hub.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE / HF_TOKEN when it is imported, so merges
run as `moemerge` subprocesses with those variables set; pushes that need no environment run in-process
with an `HfApi(endpoint=...)` handed to `moemerge.hub.push.push`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi
from safetensors import safe_open
from support.hub_server import FakeHub
from support.paths import CLI
from support.tiny_models import make_base, make_expert, make_lora, write_recipe
from transformers import LlamaForCausalLM

from moemerge.cli import error_line
from moemerge.errors import MoemergeError
from moemerge.hub.download import HubFetcher
from moemerge.hub.ids import parse_hub_id
from moemerge.hub.push import push
from moemerge.output.card import front_matter
from moemerge.output.merge import MergeOptions, merge
from moemerge.tools.verify import verify

TOKEN = "hf_plantedSECRET123"
JUNK = {
    "consolidated.safetensors": b"not for moemerge",
    "original/params.json": b"{}",
    "original/consolidated.00.pth": b"pickle",
    "pytorch_model.bin": b"pickle",
    "model-q4.gguf": b"gguf",
    "training_args.pt": b"pickle",
}


def _env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **extra,
    )
    return env


def _run(args: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def _tensor(folder: Path, name: str):
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                return handle.get_tensor(name)
    raise KeyError(name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Repos on the stand-in Hub: a base with a `v2` branch, a sharded expert, a LoRA adapter; and one
    local expert."""
    root = tmp_path_factory.mktemp("hub")
    base = make_base(root / "base")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base, main\n")
    base_v2 = make_base(root / "base_v2", seed=7)
    (base_v2 / "README.md").write_text("---\nlicense: mit\ntags: [tiny]\n---\n# base, v2\n")
    coder_src = make_expert(base, root / "coder_src", seed=1)
    LlamaForCausalLM.from_pretrained(coder_src).save_pretrained(root / "coder", max_shard_size="20KB")
    make_lora(base, root / "lora", seed=3)
    local = make_expert(base, root / "local-writer", seed=2)
    hub = FakeHub().start()
    commits = {
        "base@main": hub.add_model("org/base", base, extra=JUNK),
        "base@v2": hub.add_model("org/base", base_v2, branch="v2", extra=JUNK),
        "coder@main": hub.add_model("org/coder", root / "coder", extra={**JUNK, "README.md": b"# coder\n"}),
        "lora@main": hub.add_model("org/lora", root / "lora", extra={"adapter_model.bin": b"pickle"}),
    }
    yield {"root": root, "hub": hub, "commits": commits, "base_v2": base_v2, "coder": root / "coder", "local": local}
    hub.stop()


@pytest.fixture(scope="module")
def merged(world):
    """One merge from Hub ids (a pinned branch, a sharded expert, an adapter) plus a local expert, pushed to
    a new private repo, with a planted token in the environment."""
    root, hub = world["root"], world["hub"]
    experts = [
        {"source_model": "org/coder", "name": "coder", "positive_prompts": ["def main():", "import os"]},
        {"source_model": "org/lora@main", "name": "maths", "positive_prompts": ["12 + 30 = 42"]},
        {"source_model": str(world["local"]), "name": "writer", "negative_prompts": ["x | y"]},
    ]
    recipe = write_recipe(root / "recipe.yaml", "org/base@v2", experts)
    out = root / "out"
    before = len(hub.requests)
    run = _run([recipe, out, "--push-to-hub", "org/merged", "--private"], _env(hub, root / "hf-home"))
    assert run.returncode == 0, run.stderr
    return {"out": out, "run": run, "requests": hub.requests[before:], "recipe": recipe, "home": root / "hf-home"}


def test_hub_ids_are_told_apart_from_paths():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("mistralai/Mistral-7B-v0.1@refs/pr/3") == ("mistralai/Mistral-7B-v0.1", "refs/pr/3")
    assert parse_hub_id("org/name@" + "a" * 40) == ("org/name", "a" * 40)
    for text in ("name", "./org/name", "/abs/org", "org/name/sub", "a/b+c/d", "org/na--me", "org/name@", "-o/name"):
        assert parse_hub_id(text) is None, text


def test_branch_revision_is_resolved_and_its_commit_recorded(world, merged):
    manifest = json.loads((merged["out"] / "moemerge.json").read_text())
    commits = world["commits"]
    assert manifest["sources"] == {
        "base_model": {"id": "org/base", "revision": "v2", "commit": commits["base@v2"]},
        "experts[0].source_model": {"id": "org/coder", "revision": "main", "commit": commits["coder@main"]},
        "experts[1].source_model": {"id": "org/lora", "revision": "main", "commit": commits["lora@main"]},
        "experts[2].source_model": {"path": str(world["local"])},
    }
    # the attention really is v2's, and nothing was read from the base's main commit
    name = "model.layers.1.self_attn.q_proj.weight"
    assert _tensor(merged["out"], name).equal(_tensor(world["base_v2"], name))
    assert not [r for r in merged["requests"] if commits["base@main"] in r.path]
    verify(merged["out"], deep=True)


def test_only_what_the_merge_reads_is_downloaded(world, merged):
    hub = world["hub"]
    got = {repo: [] for repo in ("org/base", "org/coder", "org/lora")}
    for request in merged["requests"]:
        parts = request.path.split("/")
        if request.method == "GET" and len(parts) > 4 and parts[3] == "resolve":
            got[f"{parts[1]}/{parts[2]}"].append("/".join(parts[5:]))
    for files in got.values():
        assert len(files) == len(set(files)), "a file was fetched twice"
    # the base: everything but the junk (and .gitattributes)
    base_files = set(hub.files("org/base", "v2")) - set(JUNK) - {".gitattributes"}
    assert set(got["org/base"]) == base_files
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= base_files
    # the sharded expert: config, index, and only the shards holding MLP tensors
    index = json.loads((world["coder"] / "model.safetensors.index.json").read_text())["weight_map"]
    mlp_shards = {shard for name, shard in index.items() if ".mlp." in name}
    assert set(index.values()) - mlp_shards, "the test expert should have a shard without MLP tensors"
    assert set(got["org/coder"]) == {"config.json", "model.safetensors.index.json"} | mlp_shards
    # the adapter: its config and safetensors weights, not the pickle beside them
    assert set(got["org/lora"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # and the expert's MLPs are the expert's own
    merged_w1 = _tensor(merged["out"], "model.layers.2.block_sparse_moe.experts.0.w1.weight")
    assert merged_w1.equal(_tensor(world["coder"], "model.layers.2.mlp.gate_proj.weight"))


def test_offline_second_merge_uses_the_cache(world, merged):
    hub, root = world["hub"], world["root"]
    before = len(hub.requests)
    out = root / "out-offline"
    run = _run([merged["recipe"], out], _env(hub, merged["home"], HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr
    assert len(hub.requests) == before, "offline mode made requests"
    first = json.loads((merged["out"] / "moemerge.json").read_text())
    second = json.loads((out / "moemerge.json").read_text())
    assert second["sources"] == first["sources"]
    shards = sorted(p.name for p in merged["out"].glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert all((out / s).read_bytes() == (merged["out"] / s).read_bytes() for s in shards)


def test_missing_model_is_a_one_line_error_and_no_output(world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "org/base@v2", ["org/coder", "org/does-not-exist"])
    out = tmp_path / "out"
    run = _run([recipe, out], _env(world["hub"], tmp_path / "hf-home"))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "experts[1].source_model" in lines[0] and "org/does-not-exist" in lines[0]
    assert "Traceback" not in run.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_missing_revision_and_unreachable_hub_name_key_and_id(world, tmp_path):
    fetcher = HubFetcher(endpoint=world["hub"].url, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MoemergeError) as info:
        fetcher.fetch("org/base@no-such-branch", "base_model", "base")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("base_model: 'org/base@no-such-branch'") and "no revision 'no-such-branch'" in message
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    offline = HubFetcher(endpoint=closed, cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(MoemergeError) as info:
        offline.fetch("org/coder", "experts[0].source_model", "expert")
    assert "experts[0].source_model" in str(info.value) and "not in the Hugging Face cache" in str(info.value)
    assert HubFetcher(endpoint=closed).fetch("not-a-hub-id", "base_model", "base") is None


def test_model_card_metadata_and_body(merged):
    text = (merged["out"] / "README.md").read_text()
    meta = front_matter(text)
    assert meta == {
        "license": "mit",  # from the v2 base's own card
        "base_model": ["org/base", "org/coder", "org/lora", "local-writer"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "mixtral", "merge", "moemerge"],
    }
    manifest = json.loads((merged["out"] / "moemerge.json").read_text())
    body = text.split("\n---\n", 1)[1]
    for expected in ("**coder**", "**maths**", "**writer**", "`def main():`", "`12 + 30 = 42`", "`x \\| y`"):
        assert expected in body
    assert "gate mode | `hidden`" in body and "3, 2 per token" in body
    config = json.loads((merged["out"] / "config.json").read_text())
    assert config["num_local_experts"] == 3
    index = json.loads((merged["out"] / "model.safetensors.index.json").read_text())
    total = sum(_tensor(merged["out"], n).numel() for n in index["weight_map"])
    assert f"{total:,} total" in body
    assert "moemerge eval ./out" not in body and "moemerge eval org/merged" in body
    assert 'model_id = "org/merged"' in body
    assert f"@{manifest['sources']['base_model']['commit'][:10]}" in body
    recipe = yaml.safe_load(body.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert recipe["base_model"] == "org/base@v2"


def test_trained_gates_card_reports_held_out_accuracy(tmp_path):
    from moemerge.inputs.recipe import parse_recipe
    from moemerge.output.card import model_card

    recipe = parse_recipe(
        {
            "base_model": "org/base",
            "gate_mode": "trained",
            "dataset_csv": "d.csv",
            "experts": [{"source_model": "org/a"}, {"source_model": "org/b", "name": "bee"}],
        }
    )
    training = {
        "layer_accuracy": [0.5, 0.75],
        "expert_accuracy": [0.6, 0.9],
        "train_prompts": 8,
        "holdout_prompts": 2,
        "train_tokens": 80,
        "holdout_tokens": 20,
    }
    stats = {
        "name": "out",
        "layers": 2,
        "total_params": 1000,
        "active_params": 600,
        "model_type": "mixtral",
        "title": "Mixtral",
        "class_name": "MixtralForCausalLM",
    }
    card = model_card(recipe, "base_model: org/base\n", stats, None, None, training)
    assert "license" not in front_matter(card)
    assert front_matter(card)["base_model"] == ["org/base", "org/a", "org/b"]
    assert "mean over layers: **0.625**" in card and "| bee | 0.900 |" in card
    assert "moemerge eval" not in card

    # nothing held out (holdout 0, or fewer than 2 prompts per expert): the accuracy is not called held-out
    training.update(holdout_prompts=0, holdout_tokens=0, accuracy_on="training")
    card = model_card(recipe, "base_model: org/base\n", stats, None, None, training)
    assert "Training-set token accuracy" in card and "| expert | training-set accuracy |" in card
    assert "held-out" not in card.lower().replace("no prompts were held out", "")


def test_push_uploads_the_output_to_a_new_private_repo(world, merged):
    hub, out = world["hub"], merged["out"]
    created = [c for c in hub.created if c["name"] == "merged"]
    assert created == [{"name": "merged", "organization": "org", "visibility": "private", "type": "model"}]
    assert hub.repos["org/merged"].private
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    remote = {k: v for k, v in hub.files("org/merged").items() if k != ".gitattributes"}
    assert remote == local
    assert "routing.png" in remote, "the card's picture goes to the Hub with the model"
    assert "pushed" in merged["run"].stderr and "org/merged" in merged["run"].stderr


def test_token_is_used_but_never_printed_or_written(world, merged):
    assert any(r.authorization == f"Bearer {TOKEN}" for r in merged["requests"])
    assert TOKEN not in merged["run"].stdout + merged["run"].stderr
    for folder in (merged["out"], merged["home"]):
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_failed_push_keeps_the_output_and_says_how_to_resume(world, merged, tmp_path):
    hub, out = world["hub"], merged["out"]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    hub.fail_commits = (403, f"token {TOKEN} may not write here")  # a server that echoes the token
    try:
        run = _run(["push", out, "org/pushed", "--revision", "dev"], _env(hub, tmp_path / "hf-home"))
    finally:
        hub.fail_commits = None
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: push to org/pushed failed (HTTP 403")
    assert f"resume with: moemerge push {out} org/pushed --revision dev" in lines[-1]
    assert TOKEN not in run.stdout + run.stderr
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    # resuming is the same command: the branch gets the whole output, main stays empty
    push(out, "org/pushed", revision="dev", api=HfApi(endpoint=hub.url, token=TOKEN))
    pushed = {k: v for k, v in hub.files("org/pushed", "dev").items() if k != ".gitattributes"}
    assert pushed == {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(hub.files("org/pushed", "main")) == {".gitattributes"}


def test_pull_request_and_upload_large_folder(world, merged):
    """create_pr goes through upload_folder; an HfApi that still has upload_large_folder (huggingface_hub
    1.x) gets the resumable call for plain pushes."""
    hub, out = world["hub"], merged["out"]
    calls = []

    class OldHfApi(HfApi):
        def upload_large_folder(self, **kwargs):
            calls.append(kwargs)
            return self.upload_folder(repo_id=kwargs["repo_id"], folder_path=kwargs["folder_path"])

    api = OldHfApi(endpoint=hub.url, token=TOKEN)
    url = push(out, "org/pr-target", create_pr=True, api=api)
    assert calls == [] and url.endswith("/discussions/1")
    assert "config.json" in hub.files("org/pr-target", "refs/pr/1")
    assert set(hub.files("org/pr-target", "main")) == {".gitattributes"}
    hub.fail_commits = (403, f"no ({TOKEN})")
    try:
        with pytest.raises(MoemergeError) as info:
            push(out, "org/pr-target", create_pr=True, api=HfApi(endpoint=hub.url, token=TOKEN))
    finally:
        hub.fail_commits = None
    assert "revision='refs/pr/N'" in str(info.value) and "--revision refs/pr/N" in error_line(info.value)
    assert TOKEN not in str(info.value) + error_line(info.value)
    push(out, "org/pr-target", revision="refs/pr/2", api=HfApi(endpoint=hub.url, token=TOKEN))  # resumes PR 2
    assert "config.json" in hub.files("org/pr-target", "refs/pr/2")
    push(out, "org/large", private=True, api=api)
    assert calls == [
        {"repo_id": "org/large", "folder_path": out, "repo_type": "model", "revision": None, "private": True}
    ]
    with pytest.raises(MoemergeError, match="drop revision") as info:
        push(out, "org/x", revision="dev", create_pr=True, api=api)
    assert "drop --revision" in error_line(info.value)
    with pytest.raises(MoemergeError, match="not a Hub repo id"):
        push(out, "org/x@dev", api=api)
    with pytest.raises(MoemergeError, match="not a moemerge output"):
        push(out.parent, "org/x", api=api)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A local merge written in several shards of different sizes: the files an upload sends through LFS."""
    root = tmp_path_factory.mktemp("sharded")
    base = make_base(root / "base")
    experts = [make_expert(base, root / f"e{i}", seed=i) for i in (1, 2)]
    merge(
        write_recipe(root / "r.yaml", base, experts, gate_mode="random"), root / "out", MergeOptions(shard_size=40_000)
    )
    assert len(list((root / "out").glob("*.safetensors"))) >= 3
    return root / "out"


def _local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _lfs_hub(out: Path) -> tuple[FakeHub, str]:
    """A Hub that takes weights through Git LFS, the largest shard in three parts; returns it and that shard's oid."""
    largest = max(out.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    hub = FakeHub(large_files=True, multipart_from=size, chunk_size=size // 3 + 1).start()
    return hub, hashlib.sha256(largest.read_bytes()).hexdigest()


def test_large_files_are_uploaded_through_lfs_single_and_multipart(sharded, tmp_path):
    """With Xet off (this server does not speak it), huggingface_hub sends weights through the LFS batch API:
    one PUT for smaller shards, the multipart protocol for the largest; the commit only names them."""
    hub, largest = _lfs_hub(sharded)
    try:
        run = _run(["push", sharded, "org/big"], _env(hub, tmp_path / "hf-home", HF_HUB_DISABLE_XET="1"))
        assert run.returncode == 0, run.stderr
        assert {k: v for k, v in hub.files("org/big").items() if k != ".gitattributes"} == _local_files(sharded)
        shards = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in sharded.glob("*.safetensors")}
        assert set(hub.lfs_objects) == set(shards)
        for oid, size in shards.items():
            sent = [n for o, n in hub.lfs_puts if o == oid]
            assert sum(sent) == size and len(sent) == (3 if oid == largest else 1), (oid, sent)
        kinds = dict(hub.committed)
        assert {path for path, kind in ((p, k) for k, p in hub.committed) if kind == "lfsFile"} == {
            p.name for p in sharded.glob("*.safetensors")
        }
        assert kinds.get("lfsFile") and "config.json" in {p for k, p in hub.committed if k == "file"}
    finally:
        hub.stop()


def test_interrupted_large_upload_resumes_without_sending_stored_objects_again(sharded, tmp_path):
    hub, largest = _lfs_hub(sharded)
    env = _env(hub, tmp_path / "hf-home", HF_HUB_DISABLE_XET="1")
    try:
        hub.fail_lfs = {largest}  # the largest shard's upload is refused; others in flight may be cut off
        run = _run(["push", sharded, "org/big"], env)
        assert run.returncode == 1
        last = next(line for line in run.stderr.splitlines() if line.startswith("error:"))  # tqdm bars aside
        assert last.startswith("error: push to org/big failed (") and f"{sharded} is intact" in last
        resume = shlex.split(last.split("resume with: ", 1)[1])
        assert resume[:2] == ["moemerge", "push"]
        assert set(hub.files("org/big")) == {".gitattributes"}, "nothing may be committed from a failed upload"
        stored = set(hub.lfs_objects)
        assert stored and largest not in stored

        hub.fail_lfs = set()
        sent_before = len(hub.lfs_puts)
        again = _run(resume[1:], env)
        assert again.returncode == 0, again.stderr
        shards = {hashlib.sha256(p.read_bytes()).hexdigest() for p in sharded.glob("*.safetensors")}
        resent = {oid for oid, _ in hub.lfs_puts[sent_before:]}
        assert resent == shards - stored, "stored objects were sent again, or missing ones were not"
        assert {k: v for k, v in hub.files("org/big").items() if k != ".gitattributes"} == _local_files(sharded)
    finally:
        hub.stop()


class Recorder:
    """A moemerge Progress that remembers its tasks."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[int]] = {}

    def task(self, description: str, total: int):
        self.tasks[description] = [total, 0]
        return lambda n: self.tasks[description].__setitem__(1, self.tasks[description][1] + n)


def test_download_progress_and_pickle_policy(world, tmp_path):
    hub = world["hub"]
    cache = str(tmp_path / "cache")
    progress = Recorder()
    fetcher = HubFetcher(endpoint=hub.url, cache_dir=cache, progress=progress)
    fetcher.fetch("org/coder", "experts[0].source_model", "expert")
    index = json.loads((world["coder"] / "model.safetensors.index.json").read_text())["weight_map"]
    mlp_shards = {shard for name, shard in index.items() if ".mlp." in name}
    size = sum((world["coder"] / s).stat().st_size for s in mlp_shards)
    assert progress.tasks == {"downloading org/coder": [size, size]}
    again = Recorder()
    HubFetcher(endpoint=hub.url, cache_dir=cache, progress=again).fetch("org/coder", "e", "expert")
    assert again.tasks == {}, "cached files are not downloaded again"

    config = (world["coder"] / "config.json").read_bytes()
    hub.add_model("org/pickled", extra={"config.json": config, "pytorch_model.bin": b"pickle"})
    before = len(hub.requests)
    with pytest.raises(MoemergeError, match=r"experts\[1\].source_model.*allow_pickle") as info:
        HubFetcher(endpoint=hub.url, cache_dir=cache).fetch("org/pickled", "experts[1].source_model", "expert")
    assert re.search(r"experts\[1\].source_model.*--allow-pickle", error_line(info.value))
    assert "pytorch_model.bin" not in hub.downloaded("org/pickled")
    assert len(hub.requests) > before
    folder = HubFetcher(True, endpoint=hub.url, cache_dir=cache).fetch("org/pickled", "e", "expert")
    assert (folder / "pytorch_model.bin").read_bytes() == b"pickle"
