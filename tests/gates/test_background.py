"""The gate pass runs beside the writing: its result or error reaches the writer, and a merge that stops
while it runs takes it down at its next batch instead of leaving it computing."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from safetensors.torch import load_file, save_file
from support.tiny_models import make_base

from moemerge import MergeOptions, merge
from moemerge.errors import MoemergeError
from moemerge.gates.background import GatePassCancelled, gates_in_background
from moemerge.gates.modes.mode import GateResult
from moemerge.progress import Silent


def _gate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moemerge-gates"]


def _until_no_gate_thread(seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while _gate_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _gate_threads(), "the gate pass is still running after the merge stopped"


def _trained_recipe(tmp_path, rows: list[tuple[str, int]], training: dict, **keys) -> None:
    """r.yaml: trained gates on `rows` (text, expert) written as train.csv, two experts that are a 2-layer base."""
    base = make_base(tmp_path / "base", num_hidden_layers=2)
    (tmp_path / "train.csv").write_text("prompt,expert\n" + "".join(f'"{t}",{e}\n' for t, e in rows))
    recipe = {
        "base_model": str(base),
        "gate_mode": "trained",
        "dataset_csv": str(tmp_path / "train.csv"),
        "training": training,
        "experts": [{"source_model": str(base), "name": f"e{e}"} for e in range(2)],
        **keys,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))


def test_the_result_and_the_error_reach_the_waiting_writer():
    rows = object()
    with gates_in_background(lambda progress: GateResult(rows), Silent()) as pending:
        assert pending.result(timeout=10).rows is rows

    def fails(progress):
        raise MoemergeError("training.layers: layer 9 does not exist")

    with gates_in_background(fails, Silent()) as pending, pytest.raises(MoemergeError, match="layer 9"):
        pending.result(timeout=10)


def test_leaving_the_block_cancels_the_pass_at_its_next_batch():
    batches = []

    def endless(progress):
        advance = progress.task("hidden states", 10**9)
        while True:
            time.sleep(0.001)
            advance(1)
            batches.append(1)

    with pytest.raises(KeyError), gates_in_background(endless, Silent()) as pending:
        while not batches:
            time.sleep(0.001)
        raise KeyError("the writer failed")
    assert isinstance(pending.exception(timeout=10), GatePassCancelled)
    _until_no_gate_thread()


class _Counting:
    """A progress that remembers each step's units done and total."""

    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}

    def task(self, description: str, total: int):
        self.steps[description] = step = [0, total]

        def advance(units: int) -> None:
            step[0] += units

        return advance


def test_a_merge_that_fails_while_writing_stops_its_gate_pass(tmp_path, monkeypatch):
    """Many prompts in batches of one keep the hidden-state pass busy; the write fails at once."""
    base = make_base(tmp_path / "base", num_hidden_layers=2)
    prompts = [f"prompt {i} " + "ab" * (i % 7) for i in range(400)]
    recipe = {
        "base_model": str(base),
        "gate_mode": "hidden",
        "experts": [{"source_model": str(base), "positive_prompts": prompts[e::2]} for e in range(2)],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    started = threading.Event()

    def failing_write(plan, folder, shard_size, on_tensor=None):
        while not _gate_threads():
            time.sleep(0.001)
        started.set()
        raise MoemergeError("could not write model-00001-of-00001.safetensors: disk full")

    monkeypatch.setattr("moemerge.output.merge.write_shards", failing_write)
    progress = _Counting()
    with pytest.raises(MoemergeError, match="disk full"):
        merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu", batch_size=1), progress)
    assert started.is_set()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    _until_no_gate_thread()
    done, total = progress.steps["hidden states on cpu"]
    assert done < total / 4, f"the pass went on after the merge failed: {done} of {total} prompt-layers"


def test_a_merge_stopped_while_its_routers_wait_for_the_gates_ends_at_once(tmp_path, monkeypatch):
    """The writer reaches the routers (written last) while the gate pass runs on; the merge stops right then
    (here: its progress display fails). It must end with that error, not wait for the pass to finish."""
    base = make_base(tmp_path / "base", num_hidden_layers=2)
    recipe = {
        "base_model": str(base),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts": [{"source_model": str(base), "positive_prompts": [f"p{e}"]} for e in range(2)],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    router_bytes = 2 * 2 * 32 * 4  # layers × experts × hidden × float32

    def endless_gate_pass(context):
        advance = context.progress.task("hidden states", 10**9)
        while True:
            time.sleep(0.001)
            advance(1)

    class StopsAtTheRouters:
        def task(self, description: str, total: int):
            written = [0]

            def advance(units: int) -> None:
                written[0] += units
                if description == "writing shards" and written[0] == total - router_bytes:
                    raise MoemergeError("the progress display failed")

            return advance

    monkeypatch.setattr("moemerge.output.merge.compute_gates", endless_gate_pass)
    errors = []

    def run() -> None:
        try:
            merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu"), StopsAtTheRouters())
        except MoemergeError as exc:
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the merge waits for a gate pass that only stops once the merge does"
    assert [str(e) for e in errors] == ["the progress display failed"]
    _until_no_gate_thread()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_trained_gates_hidden_pass_for_untrained_layers_stops_with_the_merge(tmp_path, monkeypatch):
    """Trained gates on some layers give the others hidden gates from a second pass over the prompts; a merge
    that fails while that pass runs stops it at its next batch too, not after every prompt went through."""
    _trained_recipe(
        tmp_path, [(f"prompt {i} " + "ab" * (i % 7), i % 2) for i in range(200)], {"steps": 5, "layers": [0]}
    )
    from moemerge.gates.layer_stream import LayerStack
    from moemerge.gates.modes import hidden as hidden_mode

    hidden_pass, batches, at_failure = threading.Event(), [0], []
    real_prototypes, real_forward = hidden_mode.hidden_prototypes, LayerStack.forward

    def prototypes(*args, **kwargs):
        hidden_pass.set()
        return real_prototypes(*args, **kwargs)

    def forward(self, *args):
        batches[0] += 1
        return real_forward(self, *args)

    def failing_write(plan, folder, shard_size, on_tensor=None):
        hidden_pass.wait(timeout=60)
        at_failure.append(batches[0])
        raise MoemergeError("could not write model-00001-of-00001.safetensors: disk full")

    monkeypatch.setattr(hidden_mode, "hidden_prototypes", prototypes)
    monkeypatch.setattr(LayerStack, "forward", forward)
    monkeypatch.setattr("moemerge.output.merge.write_shards", failing_write)
    with pytest.raises(MoemergeError, match="disk full"):
        merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu", batch_size=1))
    _until_no_gate_thread()
    assert at_failure, "the hidden pass for the untrained layers never started"
    assert batches[0] - at_failure[0] < 100, f"{batches[0] - at_failure[0]} batches ran after the merge failed"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_gate_pass_that_refuses_its_input_stops_the_writing_at_once(tmp_path):
    """The base's hidden states overflow float32 (finite weights, layer 0's down_proj scaled to ~1e37): the
    gate pass says so at its first batch past layer 0, and the merge must not first write every shard (the
    routers, which wait for the gates, come last)."""
    _trained_recipe(tmp_path, [(f"p{i} {'ab' * i}", i % 2) for i in range(8)], {}, dtype="float32")
    weights = tmp_path / "base" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mlp.down_proj.weight"] *= 1e38
    save_file(tensors, str(weights), metadata={"format": "pt"})

    class WritesOnceTheGatesFailed(_Counting):
        def task(self, description: str, total: int):
            advance = super().task(description, total)

            def slow(units: int) -> None:
                if description == "writing shards":
                    _until_no_gate_thread()  # the gate pass has ended (with its error) before the first tensor counts
                advance(units)

            return slow

    progress = WritesOnceTheGatesFailed()
    with pytest.raises(MoemergeError, match=r"the router inputs of layer 1 are not finite"):
        merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu", shard_size=1000), progress)
    done, total = progress.steps["writing shards"]
    assert done < total / 4, f"{done} of {total} bytes were written before the gate pass's error was reported"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("handler", ["cli", "python default"])
def test_a_second_ctrl_c_while_the_pass_is_waited_for_still_waits_for_it(handler):
    """The first Ctrl-C stops the merge; a second one that reaches the main thread while it waits for the gate
    pass to end must not cut that wait short: a thread left inside torch at exit aborts the process
    ("terminate called without an active exception"). Under the CLI's handler and under Python's default
    one, which raises KeyboardInterrupt wherever the main thread is."""
    import signal
    from contextlib import nullcontext

    from moemerge.interrupt import handling_signals

    def slow_batches(progress):
        advance = progress.task("hidden states", 10**9)
        while True:
            time.sleep(0.5)  # one long batch: the main thread is waiting for it when the second Ctrl-C comes
            advance(1)

    def second_ctrl_c() -> None:
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    sigint = handling_signals() if handler == "cli" else nullcontext()
    with sigint, pytest.raises(KeyboardInterrupt), gates_in_background(slow_batches, Silent()):
        threading.Thread(target=second_ctrl_c).start()
        raise KeyboardInterrupt  # the first Ctrl-C
    assert not _gate_threads(), "the merge stopped while its gate pass still ran"


def test_a_held_ctrl_c_still_joins_the_gate_thread():
    """Under Python's default handler the held KeyboardInterrupt is raised once the pass has said it ended; the
    thread may still be unwinding then (here: slowed on its way out), and leaving the block must still wait
    for it to end, as it does without the second Ctrl-C."""
    import signal

    def slow_batches(progress):
        advance = progress.task("hidden states", 10**9)
        while True:
            time.sleep(0.5)
            advance(1)

    def slow_exit(frame, event, arg) -> None:
        if event == "return" and frame.f_code.co_name == "run" and threading.current_thread().name == "moemerge-gates":
            time.sleep(0.5)

    def second_ctrl_c() -> None:
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.setprofile(slow_exit)  # only threads started from here on: the gate thread
    try:
        with pytest.raises(KeyboardInterrupt), gates_in_background(slow_batches, Silent()):
            threading.setprofile(None)
            threading.Thread(target=second_ctrl_c).start()
            raise KeyboardInterrupt  # the first Ctrl-C
    finally:
        threading.setprofile(None)
    assert not _gate_threads(), "the gate thread still ran after the block was left"


def test_a_merge_that_fails_while_trained_gates_are_fitted_stops_the_fit(tmp_path, monkeypatch):
    """Fitting a layer takes `training.steps` optimizer steps with no prompt batch between them: a merge that
    fails then must stop the fit at its next step, not after every step of the layer."""
    import torch

    from moemerge.gates import trained

    _trained_recipe(tmp_path, [(f"p{i} {'ab' * i}", i % 2) for i in range(8)], {"steps": 5000, "layers": [0]})
    fitting, steps, at_failure = threading.Event(), [0], []

    class CountingAdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            steps[0] += 1
            fitting.set()
            return super().step(*args, **kwargs)

    def failing_write(plan, folder, shard_size, on_tensor=None):
        fitting.wait(timeout=60)
        at_failure.append(steps[0])
        raise MoemergeError("could not write model-00001-of-00001.safetensors: disk full")

    monkeypatch.setattr(trained.torch.optim, "AdamW", CountingAdamW)
    monkeypatch.setattr("moemerge.output.merge.write_shards", failing_write)
    with pytest.raises(MoemergeError, match="disk full"):
        merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(device="cpu"))
    _until_no_gate_thread()
    assert steps[0] - at_failure[0] < 100, f"{steps[0] - at_failure[0]} fitting steps ran after the merge failed"
