"""Running the `moemerge` command in this process, and the checks every refusal of hostile input shares:
exit 1, exactly one `error:` line, no traceback, and every file the merge could touch left byte for byte."""

from __future__ import annotations

import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from moemerge.cli import main
from support.tiny_models import make_base, make_expert, make_lora


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: object) -> Result:
    """`moemerge ARGS` through the console script's entry point, in this process (no 4 s import per case)."""
    saved = sys.argv
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    try:
        sys.argv = ["moemerge", *(str(a) for a in args)]
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return Result(rc, out.getvalue(), err.getvalue())


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every path under `folder` (links not followed) with its bytes, link target, or '<dir>'."""
    snapshot: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            snapshot[key] = f"-> {path.readlink()}"
        elif path.is_file():
            snapshot[key] = path.read_bytes()
        else:
            snapshot[key] = "<dir>"
    return snapshot


def assert_refused(result: Result, *expect: str) -> str:
    """Exit 1, one `error:` line holding every part of `expect`, no traceback, nothing on stdout."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.lines()
    assert result.rc == 1, f"exit {result.rc}; stderr:\n{result.stderr}"
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for part in expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert result.stdout.strip() == "", result.stdout
    return lines[0]


def split_safetensors(file: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its data bytes."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(file: Path, header: object | str, data: bytes) -> None:
    """Write a header (an object, or raw JSON text for headers JSON cannot hold, such as a name twice)."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


SOURCES = ("base", "e1", "e2", "lora")


def make_sources(root: Path) -> Path:
    """What hostile-input tests damage copies of: a tiny Llama base, two full experts and a LoRA adapter."""
    base = make_base(root / "base")
    make_expert(base, root / "e1", seed=1)
    make_expert(base, root / "e2", seed=2)
    make_lora(base, root / "lora", seed=3)
    return root


def copy_sources(masters: Path, dest: Path) -> None:
    for name in SOURCES:
        shutil.copytree(masters / name, dest / name)
