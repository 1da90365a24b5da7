"""benchmarks/gpu_check.py, the check prepared for the day a GPU is lent, runs here on the CPU (--quick), so
a broken script is found before that day; its comparisons and the CUDA-peak runner are checked on their own."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from bounded import run_bounded  # noqa: E402
from gpu_check import add_trained_rates, hidden_speedups  # noqa: E402
from gpu_servers import first_difference  # noqa: E402
from merge_speed import merge_command, read_peak, with_cuda_peak  # noqa: E402


@pytest.mark.slow
def test_quick_cpu_run_passes_parts_one_and_two_and_skips_the_servers(tmp_path):
    report, table = tmp_path / "gpu_check.json", tmp_path / "gpu_check.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"]
    command += ["--workdir", str(tmp_path / "work"), "--json", str(report), "--markdown", str(table)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line[:2] in ("1 ", "2 ", "3 ")]
    assert [line.split(":")[0] for line in lines] == ["1 gates", "3 servers", "2 speed"]  # the order they run in
    assert [line.split()[2] for line in lines] == ["PASS", "SKIPPED", "MEASURED"]
    assert "vLLM" in lines[1]
    parts = {part["number"]: part for part in json.loads(report.read_text())["parts"]}
    for gate_mode in ("hidden", "trained"):
        gates = parts[1]["details"][gate_mode]
        assert set(gates["lowest_cosine_per_layer"]) == {"0", "15", "29"}  # the quick shape's sparse layers
        assert min(gates["lowest_cosine_per_layer"].values()) > 1 - 1e-6  # CPU against CPU: the same rows
        assert gates["routing_differences"] == 0 and gates["routing_compared"] > 0
    generated = parts[1]["details"]["generated"]
    assert generated["same_texts"] and generated["same_routers"]  # one seed, one device: the same merge twice
    assert set(generated["heldout_top1_accuracy"]) == {"python", "legal", "math"}
    assert all(0 <= share <= 1 for share in generated["heldout_top1_accuracy"].values())
    assert "generated on cpu" in lines[0]
    rows = {(row["gates"], row["method"]): row for row in parts[2]["details"]["rows"]}
    assert {("random", "moemerge"), ("hidden", "moemerge"), ("trained", "moemerge")} <= rows.keys()
    assert rows[("hidden", "moemerge")]["prompts_per_s"] is None or rows[("hidden", "moemerge")]["prompts_per_s"] > 0
    assert all(row["peak_gpu_gib"] is None for row in rows.values())  # no CUDA, no GPU figure
    assert "| 1 gates | pass |" in table.read_text()


def test_first_difference_names_the_step_and_both_sides_log_probabilities():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]]), dim=-1)
    ours = {"tokens": [2, 0], "logprobs": logprobs}
    assert first_difference(ours, {"tokens": [2, 0], "logprobs": [{}, {}]}) is None
    theirs = {"tokens": [2, 2], "logprobs": [{"2": -0.4}, {"2": -0.5, "1": -2.0}]}
    found = first_difference(ours, theirs)
    assert found["step"] == 1 and (found["transformers_token"], found["vllm_token"]) == (0, 2)
    normaliser = math.log(math.exp(3) + math.exp(0) + math.exp(1))  # step 1's logits are 3, 0, 1
    assert found["transformers_logprobs"] == pytest.approx([3 - normaliser, 1 - normaliser])
    assert found["vllm_logprobs"] == [None, -0.5]  # token 0 is not among vLLM's top log-probabilities
    shorter = first_difference(ours, {"tokens": [2], "logprobs": [{}]})
    assert shorter == {"step": 1, "lengths": [2, 1]}


def test_trained_rates_and_speedups_come_from_the_random_gate_rows():
    rows = [
        {"size": "1b", "gates": "random", "method": "moemerge", "median_wall_sync_s": 10.0, "prompts_per_s": None},
        {"size": "1b", "gates": "trained", "method": "moemerge", "median_wall_sync_s": 30.0, "prompts_per_s": None},
        {"size": "1b", "gates": "hidden", "method": "moemerge", "prompts_per_s": 50.0, "median_wall_sync_s": 12.0},
        {"size": "1b", "gates": "hidden", "method": "mergekit", "prompts_per_s": 8.0, "median_wall_sync_s": 90.0},
    ]
    add_trained_rates(rows, labelled=400)
    assert rows[1]["prompts_per_s"] == pytest.approx(400 / 20)
    assert hidden_speedups(rows) == {"1b": pytest.approx(50 / 8)}


def test_cuda_peak_runs_the_script_in_process_and_writes_its_peak(tmp_path):
    script = tmp_path / "tool"
    script.write_text("import sys\nimport torch\n\nprint(torch.ones(2).sum().item())\nsys.exit(3)\n")
    peak = tmp_path / "peak"
    command = with_cuda_peak(merge_command("moemerge", script, tmp_path / "r.yaml", tmp_path / "o", "cpu"), peak)
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3 and run.stdout.strip() == "2.0"  # the script's own exit status and output
    assert read_peak(peak) == 0 and not peak.exists()  # CUDA never initialised; the file is consumed
    assert read_peak(peak) is None


def _alive(pid: int) -> bool:
    """Whether `pid` is running (a zombie waiting for its parent counts as gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_stopped_at_its_deadline_stops_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "grandchild"
    command = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded(command, tmp_path / "log", timeout=2)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    with pytest.raises(subprocess.CalledProcessError):
        run_bounded(["sh", "-c", "exit 4"], tmp_path / "log", timeout=10)
