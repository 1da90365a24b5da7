"""`serve` on hostile request bodies that used to reach the model and fail there (HTTP 500): an out-of-range
seed and a lone surrogate escape in the text are OpenAI-style 400 errors, and the server keeps answering."""

from __future__ import annotations

import json

import pytest
import torch
from starlette.testclient import TestClient
from support.hostile import run_cli
from support.tiny_models import make_base, write_recipe

from moemerge.tools.engine import Engine
from moemerge.tools.serve import create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = make_base(root / "base")
    recipe = write_recipe(root / "r.yaml", base, [base, base], gate_mode="random")
    assert run_cli(recipe, root / "out", "--device", "cpu").rc == 0
    with TestClient(create_app(Engine.load(root / "out", torch.device("cpu")), "tiny")) as test_client:
        yield test_client


def chat(text: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}


# (path, raw JSON body, the parameter the error names)
BAD = {
    "seed_2_70": ("/v1/chat/completions", json.dumps(chat("ab", seed=2**70)), "seed"),
    "seed_below_int64": ("/v1/completions", json.dumps({"prompt": "ab", "seed": -(2**63) - 1}), "seed"),
    "surrogate_in_message": ("/v1/chat/completions", json.dumps(chat("ab \ud800 cd")), "messages.0.content"),
    "surrogate_in_prompt": ("/v1/completions", '{"prompt": "ab \\udfff", "max_tokens": 2}', "prompt"),
    "surrogate_in_stop": ("/v1/completions", '{"prompt": "ab", "stop": ["\\ud83d"], "max_tokens": 2}', "stop"),
}


@pytest.mark.parametrize("name", BAD)
def test_hostile_body_is_a_400(client, name):
    path, body, param = BAD[name]
    reply = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error
    assert client.post("/v1/chat/completions", json=chat("ab")).status_code == 200  # still serving


def test_largest_seed_torch_takes_is_accepted(client):
    assert client.post("/v1/chat/completions", json=chat("ab", seed=2**64 - 1, temperature=1.0)).status_code == 200


def test_paired_surrogates_are_real_text(client):
    """An emoji written as a JSON surrogate pair is one real character, not a lone surrogate."""
    body = '{"prompt": "ab \\ud83d\\ude00", "max_tokens": 2}'
    reply = client.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text


def test_top_p_below_float32_resolution_keeps_the_most_likely_token(client):
    """top_p 1e-50 is in OpenAI's range; nucleus sampling then keeps only the most likely token: greedy decoding."""
    sampled = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4, "top_p": 1e-50, "seed": 3})
    greedy = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4, "temperature": 0})
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
