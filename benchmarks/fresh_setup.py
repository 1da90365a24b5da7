"""Time the README's two setup commands as a new user would meet them: fresh copy, fresh venv, no cache.

Each run copies the working tree (tracked and untracked files that git does not ignore, so no `.venv` and
no `examples/.cache`) to a new folder and runs the command, read word for word from README.md, with
`bash -c` there. pip gets `PIP_NO_CACHE_DIR=1` and an empty `PIP_CACHE_DIR`, the Hugging Face cache is a new
empty folder, and PATH is a folder of links to every program on the original PATH except C/C++/Fortran/Rust
compilers, linkers and build tools, so a dependency that needs compiling fails instead of building; the log
is also searched for pip's "Building wheel" lines. Runs alternate demo and test commands.

    python benchmarks/fresh_setup.py --repeats 2 --json fresh_setup.json --markdown fresh_setup.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "demo": r"^python3 -m venv \.venv .*python examples/demo\.py$",
    "test": r"^python3 -m venv \.venv .*python -m pytest -q$",
}
COMPILER = re.compile(
    r"^(cc|c\+\+|cpp|c89|c99|gcc|g\+\+|gfortran|clang|clang\+\+|cmake|make|ninja|ld|ld\..*|as|rustc|cargo|nvcc)"
    r"(-[0-9.]+)?$|^.*-(gcc|g\+\+|cpp|gfortran|ld|as)(-[0-9.]+)?$"
)
BUILD_LINE = re.compile(r"Building (?:wheel|editable) for (\S+)|Running setup\.py install for (\S+)")


def readme_commands() -> dict[str, str]:
    """The two commands exactly as README.md prints them."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    found = {}
    for name, pattern in COMMANDS.items():
        matches = [line for line in lines if re.match(pattern, line)]
        if len(matches) != 1:
            raise SystemExit(f"error: README.md has {len(matches)} lines matching the {name} command {pattern!r}")
        found[name] = matches[0]
    return found


def compiler_free_path(folder: Path) -> str:
    """A PATH of one folder holding links to every program on today's PATH except compilers and build tools.

    The base interpreter's own folder comes first, so `python3` is the one a user without this venv would
    get; the current virtual environment is left out."""
    venv = os.environ.get("VIRTUAL_ENV")
    dirs = [str(Path(sys.base_prefix) / "bin"), *os.environ["PATH"].split(os.pathsep)]
    folder.mkdir(parents=True)
    for directory in dirs:
        if not directory or (venv and Path(directory).resolve() == (Path(venv) / "bin").resolve()):
            continue
        for program in sorted(Path(directory).glob("*")) if Path(directory).is_dir() else []:
            link = folder / program.name
            if COMPILER.match(program.name) or link.exists() or not os.access(program, os.X_OK):
                continue
            link.symlink_to(program.resolve())
    return str(folder)


def copy_tree(target: Path) -> None:
    """The working tree as a fresh clone would have it, plus uncommitted changes."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def fresh_env(scratch: Path) -> dict[str, str]:
    """The environment of a new user: no venv, no PYTHONPATH, empty caches, no compilers on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    env.update(
        PATH=compiler_free_path(scratch / "bin"),
        PIP_NO_CACHE_DIR="1",
        PIP_CACHE_DIR=str(scratch / "pip-cache"),
        HF_HOME=str(scratch / "hf"),
        XDG_CACHE_HOME=str(scratch / "cache"),
    )
    return env


def run_once(name: str, command: str, work: Path) -> dict:
    """One fresh run of one command: wall time, exit code, the phases its output reports, source builds."""
    scratch = Path(tempfile.mkdtemp(prefix=f"fresh-{name}-", dir=work))
    try:
        repo = scratch / "repo"
        copy_tree(repo)
        env = fresh_env(scratch)
        compilers = [c for c in ("cc", "gcc", "c++", "g++", "cmake", "clang") if shutil.which(c, path=env["PATH"])]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        log = done.stdout + done.stderr
        (work / f"{scratch.name}.log").write_text(log)
        builds = sorted({m.group(1) or m.group(2) for m in BUILD_LINE.finditer(log)})
        pytest = re.search(r"(\d+) passed.* in ([0-9.]+)s", log)
        demo = re.search(r"demo finished in ([0-9.]+) s", log)
        return {
            "command": name,
            "returncode": done.returncode,
            "seconds": round(seconds, 1),
            "tests_passed": int(pytest.group(1)) if pytest else None,
            "pytest_seconds": float(pytest.group(2)) if pytest else None,
            "demo_seconds": float(demo.group(1)) if demo else None,
            "wheels_built": builds,
            "compilers_on_path": compilers,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "log": str(work / f"{scratch.name}.log"),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def machine() -> str:
    """CPU model, core count, memory and Python, in one line."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def markdown(result: dict) -> str:
    """The table the README quotes, with how it was made."""
    lines = [
        f"`{result['invocation']}` — {result['date']}, {result['machine']}, commit {result['commit']}",
        "",
        "| command | runs | median min | min–max min | of which tests / demo (median s) | built from source | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in COMMANDS:
        runs = [r for r in result["runs"] if r["command"] == name]
        if not runs:
            continue
        minutes = [r["seconds"] / 60 for r in runs]
        inner = [r["pytest_seconds"] if name == "test" else r["demo_seconds"] for r in runs]
        inner = [s for s in inner if s is not None]
        built = sorted({w for r in runs for w in r["wheels_built"] if w != "moemerge"})
        lines.append(
            f"| {name} | {len(runs)} | {statistics.median(minutes):.1f} | {min(minutes):.1f}–{max(minutes):.1f} | "
            f"{statistics.median(inner):.0f} | {', '.join(built) or 'nothing'} | "
            f"{', '.join(sorted({str(r['returncode']) for r in runs}))} |"
        )
    loads = [r[k] for r in result["runs"] for k in ("load_before", "load_after")]
    lines += [
        "",
        f"(empty pip and Hugging Face caches, no compiler on PATH; the machine was shared: 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f} during the runs; `moemerge` itself is the only wheel built, pure Python)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command, alternating")
    parser.add_argument("--commands", default="demo,test")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moemerge-fresh-setup")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    commands = readme_commands()
    args.workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {
        "invocation": "python benchmarks/fresh_setup.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": commit.stdout.strip() + ("+dirty" if dirty.strip() else ""),
        "commands": commands,
        "runs": [],
    }
    for _ in range(args.repeats):
        for name in args.commands.split(","):
            run = run_once(name, commands[name], args.workdir)
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
            write(result, args.json, args.markdown)  # after every run: a stopped session keeps what it measured
    print(markdown(result))


def write(result: dict, json_path: Path | None, markdown_path: Path | None) -> None:
    """The JSON of every run so far and the table made from them."""
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(markdown(result) + "\n")


if __name__ == "__main__":
    main()
