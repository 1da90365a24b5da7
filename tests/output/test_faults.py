"""Interrupted and failing merges: OUT is absent or complete, never half-written; leftovers are cleaned."""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support.paths import CLI
from support.tiny_models import make_base, make_expert, write_recipe

from moemerge.tools.verify import verify

pytestmark = pytest.mark.slow  # injects faults into whole merges run by the CLI


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    base = make_base(root / "base", hidden_size=128, intermediate_size=256, num_hidden_layers=6)
    experts = [make_expert(base, root / f"e{i}", seed=i) for i in range(3)]
    # many prompts, so the hidden-state pass lasts long enough to be caught in the act
    specs = [
        {"source_model": str(e), "positive_prompts": [f"{c * 8} {c * 12} {n}" for n in range(20)]}
        for e, c in zip(experts, "abc", strict=True)
    ]
    return write_recipe(root / "r.yaml", base, specs)


def _start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, str(recipe), str(out), "--shard-size", "100KB", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.moemerge-partial-*"))


def _shard_numbers(partial: Path) -> tuple[list[int], int]:
    """Shards present in a partial folder (their numbers) and how many there will be."""
    names = [re.fullmatch(r"model-(\d+)-of-(\d+)\.safetensors", p.name) for p in partial.glob("model-*")]
    found = [m for m in names if m]
    return sorted(int(m.group(1)) for m in found), max((int(m.group(2)) for m in found), default=0)


def _complete_size(shard: Path) -> int:
    """The size a shard has once written: 8 + header + the last tensor's end offset."""
    with shard.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length + max(entry["data_offsets"][1] for entry in header.values())


def _stop_when(process: subprocess.Popen, condition, timeout: float = 300) -> None:
    """Poll until condition() holds, then freeze the process (SIGSTOP) and check it still holds, so whatever
    signal comes next arrives in exactly that state. Fails if the merge ends first: never vacuous."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the merge ended before the moment to interrupt it: {process.communicate()}"
        if condition():
            process.send_signal(signal.SIGSTOP)
            if condition():
                return
            process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("the merge never reached the moment to interrupt it")


def _writing_shard(out: Path, number: int, replacing: bool = False):
    """True once shard `number` exists and every earlier shard is complete, while later shards remain (and OUT
    is absent, or with `replacing`, still the old one)."""

    def condition() -> bool:
        partials = _partials(out)
        if len(partials) != 1 or out.exists() != replacing:
            return False
        present, total = _shard_numbers(partials[0])
        if number not in present or max(present) >= total:
            return False
        done = [partials[0] / f"model-{k:05d}-of-{total:05d}.safetensors" for k in range(1, number)]
        return all(f.stat().st_size == _complete_size(f) for f in done)

    return condition


def _computing_gates(process: subprocess.Popen, recipe: Path, out: Path):
    """True once the gate pass has begun (the base's tokenizer is loaded: the tokenizers library's native code is
    mapped, which a merge imports for the gates only) while the shards are written into the partial folder
    and OUT does not exist yet. The base's weights are streamed a layer at a time through short reads, so
    they are not a state that lasts long enough to catch."""

    def condition() -> bool:
        try:
            maps = Path(f"/proc/{process.pid}/maps").read_text()
        except OSError:
            return False
        return "/tokenizers/" in maps and len(_partials(out)) == 1 and not out.exists()

    return condition


def _started_and_stopped_at(recipe: Path, out: Path, moment: str) -> subprocess.Popen:
    """A merge started and SIGSTOPped at `moment`: "gates" (computing hidden states) or "shard N" (writing it)."""
    process = _start(recipe, out)
    if moment == "gates":
        _stop_when(process, _computing_gates(process, recipe, out))
    else:
        _stop_when(process, _writing_shard(out, int(moment.split()[1])))
    return process


@pytest.mark.parametrize("moment", ["gates", "shard 5"])
def test_sigkill_leaves_no_half_output(recipe, tmp_path, moment):
    """Killed while computing hidden states (the first shards being written meanwhile) or while writing shard 5
    of 68."""
    out = tmp_path / "out"
    process = _started_and_stopped_at(recipe, out, moment)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = _partials(out)
    assert len(leftovers) == 1, leftovers  # a SIGKILL cannot clean up after itself

    rerun = subprocess.run([CLI, str(recipe), str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not _partials(out), "the next run must clean leftovers of killed runs"
    verify(out, deep=True)


@pytest.mark.parametrize("moment", ["gates", "shard 5"])
def test_sigint_cleans_up(recipe, tmp_path, moment):
    out = tmp_path / "out"
    process = _started_and_stopped_at(recipe, out, moment)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert not _partials(out)


def _waiting_for_the_routers(out: Path):
    """True once every tensor but the routers (written last, from the gate pass) is in the partial folder."""

    def condition() -> bool:
        partials = _partials(out)
        present, total = _shard_numbers(partials[0]) if len(partials) == 1 else ([], 0)
        if not total or total not in present:
            return False
        last = partials[0] / f"model-{total:05d}-of-{total:05d}.safetensors"
        with last.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            raw = handle.read(length)
        if not length or len(raw) < length:
            return False  # the header is still being written
        header = json.loads(raw)
        routers = [v["data_offsets"][0] for k, v in header.items() if k.endswith("block_sparse_moe.gate.weight")]
        return bool(routers) and last.stat().st_size == 8 + length + min(routers)

    return condition


def test_sigint_while_the_routers_wait_for_the_gates(recipe, tmp_path):
    """Everything but the routers is written and the gate pass (1,200 long prompts, one per batch) has a
    long way to go: Ctrl-C ends the merge then, not when the pass is done."""
    spec = yaml.safe_load(recipe.read_text())
    for e, expert in enumerate(spec["experts"]):
        expert["positive_prompts"] = [f"{'abc'[e] * 8} {n} " * 60 for n in range(400)]
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    process = _start(slow, out, "--batch-size", "1")
    _stop_when(process, _waiting_for_the_routers(out))
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("after Ctrl-C the merge still waits for the gate pass") from None
    assert process.returncode == 130, stderr
    assert not out.exists() and not _partials(out)


def test_sigkill_with_existing_output_keeps_it(recipe, tmp_path):
    """--force replaces OUT only at the end: killed while writing, the old OUT is still there and whole."""
    out = tmp_path / "out"
    first = subprocess.run([CLI, str(recipe), str(out)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    (out / "marker").write_text("old")
    process = _start(recipe, out, "--force")
    _stop_when(process, _writing_shard(out, 20, replacing=True))
    process.kill()
    process.communicate()
    assert (out / "marker").read_text() == "old", "the old output must survive until the new one replaces it"
    verify(out, deep=True)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_disk_full_gives_clear_error_and_no_output(recipe, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [CLI, str(recipe), str(out), "--shard-size", "1GB"], capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert "File too large" in lines[0] and "model-00001-of-00001.safetensors" in lines[0]
    assert not out.exists()
    assert not _partials(out)
