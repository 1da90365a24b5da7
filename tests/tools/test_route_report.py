"""`moemerge route` is a Python API (tools.route_report.route_prompts) that the command prints: its rows
follow the router logits transformers computes for the written MoE, and the command's JSON and table show
those rows and nothing else."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
from support.paths import CLI
from support.tiny_models import make_base, make_expert, tiny_tokenizer, write_recipe
from transformers import AutoModelForCausalLM

from moemerge.output.merge import merge
from moemerge.tools.route_report import route_prompts
from moemerge.tools.routing import load_moe

TEXTS = ["abc gfe dab", "xyz zyx"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    base = make_base(root / "base")
    experts = [{"source_model": str(make_expert(base, root / f"e{i}", seed=i, scale=0.3))} for i in (1, 2, 3)]
    recipe = write_recipe(root / "r.yaml", base, experts, gate_mode="random")
    merge(recipe, root / "out")
    return root / "out"


def test_rows_follow_the_router_logits(moe):
    model, tokenizer, names = load_moe(moe, torch.device("cpu"))
    report = route_prompts(model, tokenizer, names, TEXTS, request_top_k=1)
    reference = AutoModelForCausalLM.from_pretrained(moe).eval()
    top_k = reference.config.num_experts_per_tok
    assert report["experts"] == names and report["top_k"] == top_k
    for text, row in zip(TEXTS, report["prompts"], strict=True):
        ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]])
        with torch.no_grad():
            logits = torch.stack(reference(ids, output_router_logits=True).router_logits)[:, 1:]  # BOS left out
        chosen = logits.topk(top_k, dim=-1).indices
        shares = torch.bincount(chosen.reshape(-1), minlength=len(names)).float() / logits[..., 0].numel()
        assert row["tokens"] == logits.shape[1]
        assert [row["shares"][name] for name in names] == pytest.approx(shares.tolist(), abs=1e-6)
        per_layer = [names[int(torch.bincount(layer[:, 0], minlength=len(names)).argmax())] for layer in chosen]
        assert row["layer_top_expert"] == per_layer
        mean = logits.softmax(dim=-1).mean(dim=(0, 1))
        assert row["request"] == {"top_k": 1, "chosen": {names[int(mean.argmax())]: 1.0}}


def test_the_command_prints_the_rows(moe):
    model, tokenizer, names = load_moe(moe, torch.device("cpu"))
    report = route_prompts(model, tokenizer, names, TEXTS, request_top_k=2)
    run = subprocess.run(
        [CLI, "route", str(moe), *TEXTS, "--json", "--device", "cpu", "--request-top-k", "2"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == report
    table = subprocess.run(
        [CLI, "route", str(moe), *TEXTS, "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert table.returncode == 0, table.stderr
    for row in route_prompts(model, tokenizer, names, TEXTS)["prompts"]:
        cells = ["".join(str(names.index(name)) for name in row["layer_top_expert"])]
        cells += [f"{row['shares'][name]:.2f}" for name in names]
        assert re.search(r"\s+│\s+".join(map(re.escape, cells)), table.stdout), table.stdout
