"""What the GPU machine lacks for gpu_check.py, packed here so it can travel there.

That machine has no network, its Python (3.12, with torch and transformers) lacks pydantic, fastapi,
uvicorn and gguf, and a call carries at most 64 MiB of ignored paths, less than the 94 MiB SmolLM2 GGUF the
demo's base is built from. So this splits the GGUF in two halves, `.gpu_carry/a` and `.gpu_carry/b` (each
under the limit), and puts the wheels, downloaded with pip for CPython 3.12 on x86-64 at the versions this
venv runs, beside the second:

    python benchmarks/gpu_carry.py            # here, once; writes .gpu_carry/ (ignored by git)

Then two device calls, the second within the machine's 30 s warm window (ignored files the first left stay):

    run(command="ls .gpu_carry/a", carry=[".gpu_carry/a"], timeout_s=60)
    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/log;
                 cp docs/results/gpu_check.* $OUT", carry=[".gpu_carry/b"], timeout_s=560)

gpu_check.py calls unpack_carried() first: it joins the halves into build_base's cache (build_base checks the
pinned sha256) and installs the wheels into .gpu_check/site, put on sys.path and on PYTHONPATH for the
merges it starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_carry"
SITE = ROOT / ".gpu_check" / "site"
GGUF = ROOT / "examples" / ".cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGES = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "fastapi",
    "starlette",
    "uvicorn",
    "gguf",
)
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")


def pack() -> None:
    """Write .gpu_carry/a (the GGUF's first half) and .gpu_carry/b (its second half and the wheels)."""
    data = GGUF.read_bytes()
    half = len(data) // 2
    shutil.rmtree(CARRY, ignore_errors=True)
    for name, piece in (("a", data[:half]), ("b", data[half:])):
        (CARRY / name).mkdir(parents=True)
        (CARRY / name / "gguf.part").write_bytes(piece)
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    command += ["--implementation", "cp", *platforms, "--dest", str(CARRY / "b" / "wheels")]
    subprocess.run([*command, *(f"{name}=={version(name)}" for name in PACKAGES)], check=True)
    sizes = {name: sum(f.stat().st_size for f in (CARRY / name).rglob("*") if f.is_file()) for name in "ab"}
    print(", ".join(f".gpu_carry/{name}: {size / 2**20:.1f} MiB" for name, size in sizes.items()))


def unpack_carried() -> None:
    """On the GPU machine: the GGUF joined into build_base's cache and the wheels installed into
    .gpu_check/site, once; a machine without .gpu_carry (this one) is left as it is."""
    halves = [CARRY / name / "gguf.part" for name in "ab"]
    if not GGUF.is_file() and all(half.is_file() for half in halves):
        GGUF.parent.mkdir(parents=True, exist_ok=True)
        partial = GGUF.with_suffix(".partial")
        partial.write_bytes(b"".join(half.read_bytes() for half in halves))
        partial.replace(GGUF)
    wheels = sorted((CARRY / "b" / "wheels").glob("*.whl"))
    if wheels and not SITE.is_dir():
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE)]
        subprocess.run([*install, *map(str, wheels)], check=True)
    if SITE.is_dir():
        sys.path.insert(0, str(SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)


if __name__ == "__main__":
    pack()
