"""What the GPU machine lacks for gpu_check.py, packed here so it can travel there.

That machine has no network, its Python (3.12, with torch and transformers) lacks pydantic, fastapi,
uvicorn, gguf and xxhash, and a call carries at most 64 MiB in all, the tracked files (about 25 MiB) included: less
than the 94 MiB SmolLM2 GGUF the demo's base is built from. So this splits the GGUF in three pieces,
`.gpu_carry/1` to `.gpu_carry/3` (31 MiB each), and puts the wheels, downloaded with pip for CPython 3.12 on
x86-64 at the versions this venv runs, beside the last:

    python benchmarks/gpu_carry.py            # here, once; writes .gpu_carry/ (ignored by git)

Then three device calls, each within the machine's 30 s warm window after the one before (ignored files an
earlier call left stay there):

    run(command="ls .gpu_carry", carry=[".gpu_carry/1"], timeout_s=60)
    run(command="ls .gpu_carry", carry=[".gpu_carry/2"], timeout_s=60)
    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/log;
                 cp docs/results/gpu_check.* $OUT", carry=[".gpu_carry/3"], timeout_s=560)

gpu_check.py calls unpack_carried() first: it joins the pieces into build_base's cache (build_base checks the
pinned sha256) and installs the wheels into .gpu_check/site, put on sys.path and on PYTHONPATH for the
merges it starts.
"""

from __future__ import annotations

import importlib.util
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
    "xxhash",  # the shard digests (moemerge.digests)
)
PIECES = 3
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")


def pack() -> None:
    """Write .gpu_carry/1 to .gpu_carry/PIECES, the GGUF's pieces, and the wheels beside the last one."""
    data = GGUF.read_bytes()
    step = -(-len(data) // PIECES)
    shutil.rmtree(CARRY, ignore_errors=True)
    for number in range(1, PIECES + 1):
        (CARRY / str(number)).mkdir(parents=True)
        (CARRY / str(number) / "gguf.part").write_bytes(data[(number - 1) * step : number * step])
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    command += ["--implementation", "cp", *platforms, "--dest", str(CARRY / str(PIECES) / "wheels")]
    subprocess.run([*command, *(f"{name}=={version(name)}" for name in PACKAGES)], check=True)
    sizes = {path.name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for path in CARRY.iterdir()}
    print(", ".join(f".gpu_carry/{name}: {size / 2**20:.1f} MiB" for name, size in sizes.items()))


def unpack_carried() -> None:
    """On the GPU machine: the GGUF's pieces joined into build_base's cache and the wheels installed into
    .gpu_check/site, once; a machine that has the GGUF and pydantic (this one) is left as it is."""
    pieces = [CARRY / str(number) / "gguf.part" for number in range(1, PIECES + 1)]
    if not GGUF.is_file() and all(piece.is_file() for piece in pieces):
        GGUF.parent.mkdir(parents=True, exist_ok=True)
        partial = GGUF.with_suffix(".partial")
        partial.write_bytes(b"".join(piece.read_bytes() for piece in pieces))
        partial.replace(GGUF)
    wheels = sorted((CARRY / str(PIECES) / "wheels").glob("*.whl"))
    if wheels and not SITE.is_dir() and importlib.util.find_spec("pydantic") is None:
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE)]
        subprocess.run([*install, *map(str, wheels)], check=True)
    if SITE.is_dir():
        sys.path.insert(0, str(SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)


if __name__ == "__main__":
    pack()
