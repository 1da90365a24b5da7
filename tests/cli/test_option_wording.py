"""Library errors name options by their Python names (keyword arguments, `routing.*` fields), never a flag; the
CLI prints the same line with its flags. For each place that names an option: the library's words (str()), the
options it names, and the line the CLI prints (moemerge.cli.error_line, what `_run` prints after `error: `).
The CLI lines are the ones moemerge printed before the library stopped naming flags, unchanged."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support.hub_server import FakeHub
from support.paths import CLI

from moemerge.cli import error_line
from moemerge.device import resolve_device
from moemerge.errors import MoemergeError
from moemerge.hub.download import HubFetcher
from moemerge.hub.push import check_push_target, push
from moemerge.inputs.sources import TensorStore
from moemerge.output.staging import check_output
from moemerge.tools.engine import Engine
from moemerge.tools.request_routing import RequestRouting
from moemerge.tools.serve import _check_can_listen


@dataclass
class Wording:
    library: str
    cli: str
    options: tuple[str, ...] = ()


def _raised(action: Callable[[], object]) -> MoemergeError:
    with pytest.raises(MoemergeError) as caught:
        action()
    return caught.value


def _check(error: MoemergeError, expected: Wording) -> None:
    assert str(error) == expected.library
    assert "--" not in str(error)
    assert error_line(error) == expected.cli
    assert getattr(error, "options", ()) == expected.options


# -- output/staging.py ------------------------------------------------------------------------------------------


def test_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _check(
        _raised(lambda: check_output(out, False, [])),
        Wording(
            f"{out} already exists; choose another output folder or pass force to replace it",
            f"{out} already exists; choose another output folder or pass --force to replace it",
            ("force",),
        ),
    )
    out.rmdir()
    out.write_text("a file")
    _check(
        _raised(lambda: check_output(out, True, [])),
        Wording(
            f"{out} exists and is a file; force only replaces an output folder",
            f"{out} exists and is a file; --force only replaces an output folder",
            ("force",),
        ),
    )


# -- inputs/sources.py, hub/download.py -------------------------------------------------------------------------


def test_allow_pickle_for_local_weights(tmp_path):
    weights = tmp_path / "{a model}" / "pytorch_model.bin"  # braces in a path are text, not fields
    weights.parent.mkdir()
    weights.write_bytes(b"not read")
    folder = weights.parent
    end = "has only pickled .bin weights, which can run code when loaded; convert them to safetensors or pass"
    _check(
        _raised(lambda: TensorStore([weights], "experts[0].source_model", allow_pickle=False)),
        Wording(
            f"experts[0].source_model: {folder} {end} allow_pickle if you trust the source",
            f"experts[0].source_model: {folder} {end} --allow-pickle if you trust the source",
            ("allow_pickle",),
        ),
    )


@pytest.fixture(scope="module")
def hub():
    hub = FakeHub().start()
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
    hub.add_model("org/pickled", extra={"config.json": config, "pytorch_model.bin": b"pickle"})
    hub.add_model("org/pickled-lora", extra={"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"})
    yield hub
    hub.stop()


def test_allow_pickle_for_hub_weights(hub, tmp_path):
    def fetch(repo_id: str, role: str, allow_pickle: bool = False):
        fetcher = HubFetcher(allow_pickle, endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
        return lambda: fetcher.fetch(repo_id, "experts[1].source_model", role)

    model = "experts[1].source_model: the Hub model org/pickled has no safetensors weights moemerge reads"
    _check(
        _raised(fetch("org/pickled", "expert")),
        Wording(
            f"{model} (pickled .bin weights need allow_pickle)",
            f"{model} (pickled .bin weights need --allow-pickle)",
            ("allow_pickle",),
        ),
    )
    adapter = "experts[1].source_model: the Hub adapter org/pickled-lora has no adapter_model.safetensors"
    _check(
        _raised(fetch("org/pickled-lora", "adapter")),
        Wording(
            f"{adapter} (a pickled adapter_model.bin needs allow_pickle)",
            f"{adapter} (a pickled adapter_model.bin needs --allow-pickle)",
            ("allow_pickle",),
        ),
    )
    assert (fetch("org/pickled", "expert", allow_pickle=True)() / "pytorch_model.bin").read_bytes() == b"pickle"


# -- device.py ---------------------------------------------------------------------------------------------------


def test_device(monkeypatch):
    _check(
        _raised(lambda: resolve_device("tpu")),
        Wording("device 'tpu': use auto, cpu or cuda", "--device 'tpu': use auto, cpu or cuda", ("device",)),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _check(
        _raised(lambda: resolve_device("cuda")),
        Wording(
            "device cuda: no CUDA device is available here; use device auto or cpu",
            "--device cuda: no CUDA device is available here; use --device auto or cpu",
            ("device",),
        ),
    )


# -- tools/serve.py ----------------------------------------------------------------------------------------------


def test_host_and_port():
    host = "x" * 64 + ".invalid"  # a DNS label is at most 63 characters: refused before any lookup
    with pytest.raises(UnicodeError) as caught:
        socket.getaddrinfo(host, 8000, type=socket.SOCK_STREAM)
    reason = caught.value
    _check(
        _raised(lambda: _check_can_listen(host, 8000)),
        Wording(f"host {host}: {reason}", f"--host {host}: {reason}", ("host",)),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        words = f"cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}; choose another"
        _check(
            _raised(lambda: _check_can_listen("127.0.0.1", port)),
            Wording(f"{words} port", f"{words} --port", ("port",)),
        )


# -- hub/push.py -------------------------------------------------------------------------------------------------


class RefusingApi:
    """An HfApi whose first call fails, as a Hub that refuses the push would."""

    endpoint, token = "http://127.0.0.1:9", None

    def create_repo(self, *args, **kwargs):
        raise RuntimeError("refused")


@pytest.fixture
def out(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "moemerge.json").write_text("{}")
    return out


def test_revision_and_create_pr(out):
    _check(
        _raised(lambda: check_push_target("org/x", "dev", True, need_token=False)),
        Wording(
            "create_pr opens a pull request against main; drop revision, or push to the branch",
            "--create-pr opens a pull request against main; drop --revision, or push to the branch",
            ("create_pr", "revision"),
        ),
    )
    failed = f"push to org/x failed (RuntimeError: refused); {out} is intact; resume with:"
    _check(
        _raised(lambda: push(out, "org/x", revision="dev", api=RefusingApi())),
        Wording(
            f"{failed} push('{out}', 'org/x', revision='dev')", f"{failed} moemerge push {out} org/x --revision dev"
        ),
    )
    call = f"push('{out}', 'org/x', private=True, revision='refs/pr/N')"
    command = f"moemerge push {out} org/x --private --revision refs/pr/N"
    _check(
        _raised(lambda: push(out, "org/x", private=True, create_pr=True, api=RefusingApi())),
        Wording(
            f"{failed} {call} (N: the pull request named above; create_pr=True opens a new one)",
            f"{failed} {command} (N: the pull request named above; --create-pr opens a new one)",
        ),
    )


def test_the_cli_prints_the_flags():
    run = subprocess.run(
        [CLI, "push", "out", "org/x", "--revision", "dev", "--create-pr"], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert (
        run.stderr.strip()
        == "error: --create-pr opens a pull request against main; drop --revision, or push to the branch"
    )


# -- tools/request_routing.py, tools/engine.py -------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, option, flag, words",
    [
        (
            RequestRouting("sequence"),
            "routing.mode",
            "--routing",
            "unknown routing mode 'sequence'; use token or request",
        ),
        (
            RequestRouting("request", 0),
            "routing.top_k",
            "--request-top-k",
            "top_k 0: a request gets 1 to 3 experts (this model has 3)",
        ),
        (
            RequestRouting("request", 1, "avg"),
            "routing.mixing",
            "--request-mixing",
            "unknown mixing 'avg'; use router or fixed",
        ),
        (
            RequestRouting("request", 1, "router", ("nobody",)),
            "routing.experts",
            "--expert",
            "unknown expert 'nobody'; this model has e0, e1, e2",
        ),
    ],
)
def test_routing_settings(settings, option, flag, words):
    expected = Wording(f"{option}: {words}", f"{flag}: {words}", (option,))
    _check(_raised(lambda: settings.checked(["e0", "e1", "e2"])), expected)
    # the engine checks its default routing first, before it touches the model
    _check(_raised(lambda: Engine(None, None, ["e0", "e1", "e2"], settings)), expected)


def test_errors_that_name_no_option_print_as_they_are():
    assert error_line(MoemergeError("experts[0]: {force} not found")) == "experts[0]: {force} not found"
