"""Running the `moemerge` command many times, fast: a fork server that imports moemerge once and forks a fresh
child per run (own stdio and exit status), and `spawn`/`Job` that exec the console script itself."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.paths import CLI

CASE_TIMEOUT = 120

FORK_SERVER = textwrap.dedent(
    r"""
    import json, os, sys, traceback

    from moemerge.cli import main

    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(job["cwd"])
                os.environ.update(job["env"])
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
                os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
                sys.argv = ["moemerge", *job["args"]]
                try:
                    main()
                    code = 0
                except SystemExit as exc:  # what the interpreter does with sys.exit(x)
                    if exc.code is None or isinstance(exc.code, int):
                        code = exc.code or 0
                    else:
                        print(exc.code, file=sys.stderr)
                        code = 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
    """
)


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


class ForkServer:
    """One process that has imported moemerge; each run is a forked child with fresh stdio and exit status."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(scratch / "server.log", "w"),  # noqa: SIM115 - lives as long as the server
            text=True,
            bufsize=1,
        )
        self.ready = False

    def _readline(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT)
        if not ready:
            self.close()
            pytest.fail(f"the moemerge fork server did not answer in {CASE_TIMEOUT} s")
        line = self.proc.stdout.readline()
        if not line:
            log = (self.scratch / "server.log").read_text()
            pytest.fail(f"the moemerge fork server died:\n{log}")
        return line

    def run(self, args: list[str], cwd: Path, env: dict[str, str]) -> Result:
        if not self.ready:
            assert self._readline().strip() == "ready"
            self.ready = True
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        job = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self._readline())["rc"]
        return Result(rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Job:
    """The console script itself, exec'd now and collected later, so its ~4 s import overlaps other work."""

    def __init__(self, args: list, cwd: Path, env: dict[str, str] | None = None, prefix: list[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, CLI, *(str(a) for a in args)],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )

    def result(self) -> Result:
        try:
            stdout, stderr = self.proc.communicate(timeout=CASE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail(f"moemerge ran past {CASE_TIMEOUT} s")
        return Result(self.proc.returncode, stdout, stderr)


def spawn(args: list, cwd: Path, env: dict[str, str] | None = None, prefix: list[str] = ()) -> Result:
    return Job(args, cwd, env, prefix).result()
