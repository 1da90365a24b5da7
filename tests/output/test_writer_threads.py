"""The shard writer's helper thread computes on one core, and only it: beside a gate pass, a second OpenMP
team of full size made the OpenMP runtime stop spin-waiting in every team (moemerge.device.one_torch_thread)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from moemerge.device import one_torch_thread
from moemerge.output.writer import PlannedTensor, write_shards


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def in_thread(work) -> object:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(work()))
    thread.start()
    thread.join()
    return seen[0]


def test_one_torch_thread_holds_for_the_calling_thread_only(two_threads):
    def limited() -> tuple[int, int]:
        one_torch_thread()
        return torch.get_num_threads(), in_thread(torch.get_num_threads)

    helper, started_after = in_thread(limited)
    assert helper == 1
    assert started_after == 2, "a thread started after the limit must keep torch's thread count"
    assert torch.get_num_threads() == 2, "the calling thread's limit must not reach the main thread"


def test_the_shard_writer_makes_tensors_on_one_core(two_threads, tmp_path):
    counts: list[int] = []
    values = [torch.arange(6, dtype=torch.float32).reshape(2, 3) + k for k in range(3)]

    def produce(value: torch.Tensor):
        def made() -> torch.Tensor:
            counts.append(torch.get_num_threads())
            return value

        return made

    plan = [PlannedTensor(f"t{k}", (2, 3), torch.float32, produce(v)) for k, v in enumerate(values)]
    write_shards(plan, tmp_path, shard_size=10**6)
    assert counts == [1, 1, 1]
    written = {k: v for shard in tmp_path.glob("*.safetensors") for k, v in load_file(shard).items()}
    assert all(torch.equal(written[f"t{k}"], v) for k, v in enumerate(values))
    assert torch.get_num_threads() == 2
