"""`serve` on hostile request bodies that used to reach the model and fail there (HTTP 500): an out-of-range
seed and a lone surrogate escape in the text are OpenAI-style 400 errors, and the server keeps answering."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


# The tiny model's context is 128 tokens: prompts up to 32 characters a token (4096) are tokenized, and bodies
# up to 16 bytes per such character (65536 bytes) are read.
PROMPT_CHARS, BODY_BYTES = 4096, 65536


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_a_413_naming_it(client, chunked):
    body = json.dumps({"prompt": "a" * BODY_BYTES, "max_tokens": 1}).encode()
    content = iter([body[i : i + 4096] for i in range(0, len(body), 4096)]) if chunked else body
    reply = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert f"limit of {BODY_BYTES} bytes" in reply.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=chat("ab")).status_code == 200  # still serving


TWO_MESSAGES = [{"role": "user", "content": "b" * 2048}, {"role": "user", "content": "c" * (PROMPT_CHARS - 2047)}]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "a" * (PROMPT_CHARS + 1), "max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"messages": TWO_MESSAGES, "max_tokens": 1}, "messages"),
    ],
)
def test_prompt_over_the_limit_is_a_400_naming_it(client, path, body, param):
    """Refused before tokenizing: the messages' contents count together."""
    reply = client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and f"at most {PROMPT_CHARS}" in error["message"], error


def test_health_answers_while_a_prompt_is_tokenized(client, monkeypatch):
    """Tokenizing runs off the event loop: /health answers while a (here: stalled) tokenization is under way."""
    engine = client.app.state.server.engine
    entered, release = threading.Event(), threading.Event()
    tokenize = engine.text_ids

    def stalled(prompt: str) -> list[int]:
        entered.set()
        release.wait(10)
        return tokenize(prompt)

    monkeypatch.setattr(engine, "text_ids", stalled)
    with ThreadPoolExecutor(1) as pool:
        completion = pool.submit(client.post, "/v1/completions", json={"prompt": "ab", "max_tokens": 1})
        assert entered.wait(10)
        started = time.monotonic()
        health = client.get("/health")
        waited = time.monotonic() - started
        release.set()
        assert completion.result().status_code == 200
    assert health.status_code == 200 and waited < 2, waited


@pytest.mark.parametrize(
    "routing, param",
    [({"experts": []}, "routing.experts"), ({"experts": ["base"], "mode": "token"}, "routing.mode")],
    ids=["no_experts", "experts_with_token_mode"],
)
def test_routing_errors_name_only_fields_the_request_sent(client, routing, param):
    reply = client.post("/v1/chat/completions", json=chat("ab", routing=routing))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert "top_k" not in error["message"] and "mixing" not in error["message"], error


@pytest.mark.parametrize(
    "send, content_type",
    [
        ({"data": {"prompt": "ab"}}, "application/x-www-form-urlencoded"),
        ({"files": {"prompt": (None, "ab")}}, "multipart/form-data"),
        ({"content": json.dumps({"prompt": "ab"}).encode()}, "missing"),
    ],
    ids=["form", "multipart", "no_content_type"],
)
def test_a_body_not_sent_as_json_is_told_the_content_type(client, send, content_type):
    reply = client.post("/v1/completions", **send)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "Content-Type: application/json" in message and content_type in message, message
