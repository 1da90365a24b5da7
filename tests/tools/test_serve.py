"""`moemerge serve` with the real openai client, against a tiny merged MoE; `moemerge chat` on the same model.

Routing is checked against router logits computed here with transformers in one full forward pass over
prompt + completion: prompt share of expert e = fraction of (layer, prompt token) pairs whose top-k includes e;
completion share = the same over the positions that produced each generated token (positions P-1 .. P+C-2)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from support.paths import CLI
from support.tiny_models import make_base, make_expert, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge import MergeOptions, merge
from moemerge.tools.engine import FALLBACK_CHAT_TEMPLATE, Engine
from moemerge.tools.text_stream import TextStream

pytestmark = pytest.mark.slow  # starts the server and generates

NAMES = ["code", "law", "math"]
MODEL = "tiny-moe"
CONTEXT = 1024
# only characters of the tiny tokenizer's vocabulary, so every template token is a real one
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}. {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    base = make_base(root / "base", max_position_embeddings=CONTEXT)
    experts = [make_expert(base, root / f"e{i}", seed=i) for i in range(3)]
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [{"source_model": str(e), "name": n} for e, n in zip(experts, NAMES, strict=True)],
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge(root / "r.yaml", root / "out", MergeOptions(device="cpu"))
    config = root / "out" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE}))
    return root / "out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(out: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`moemerge serve` in a process of its own, once /health answers."""
    port = _free_port()
    command = [CLI, "serve", str(out), "--port", str(port), "--device", "cpu", "--model-name", MODEL]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a loaded CI machine can take minutes to import torch and load
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(out, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    process, url = _start_server(out, log)
    yield process, url, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(out):
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def _expected_routing(model, prompt_ids: list[int], completion_ids: list[int]) -> dict[str, dict[str, float]]:
    """Shares from one full forward pass over prompt + completion (all but the last generated token)."""
    p, c = len(prompt_ids), len(completion_ids)
    ids = torch.tensor([prompt_ids + completion_ids[:-1]])
    with torch.no_grad():
        logits = torch.stack(model(ids, output_router_logits=True).router_logits)  # [layers, tokens, experts]
    top = logits.topk(2, dim=-1).indices
    layers = logits.shape[0]
    prompt = torch.bincount(top[:, :p].reshape(-1), minlength=3) / (layers * p)
    completion = torch.bincount(top[:, p - 1 : p + c - 1].reshape(-1), minlength=3) / (layers * c)
    return {n: {"prompt": float(prompt[i]), "completion": float(completion[i])} for i, n in enumerate(NAMES)}


def _greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        sequence = model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
        )
    generated = sequence[0, len(prompt_ids) :].tolist()
    return generated[: generated.index(2) + 1] if 2 in generated else generated  # up to and with EOS


def _check_routing(reply, expected=None):
    routing = reply.routing
    assert routing["top_k"] == 2 and routing["layers"] == 3
    assert list(routing["experts"]) == NAMES
    for which in ("prompt", "completion"):
        shares = [routing["experts"][n][which] for n in NAMES]
        assert all(0 <= s <= 1 for s in shares)
        assert sum(shares) == pytest.approx(2.0)
    assert reply.expert == routing["top_expert"] in NAMES
    completion = {n: routing["experts"][n]["completion"] for n in NAMES}
    assert completion[routing["top_expert"]] == max(completion.values())
    assert 0 <= routing["routing_duration"] < 5
    if expected is not None:
        for name in NAMES:
            assert routing["experts"][name] == pytest.approx(expected[name]), name


def _chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server[1]}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_completion_text_usage_and_routing_match_transformers(client, hf):
    model, tokenizer = hf
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add one and one"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    prompt_ids = _chat_ids(tokenizer, messages)
    completion_ids = _greedy(model, tokenizer, prompt_ids, 32)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(completion_ids, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if completion_ids[-1] == 2 else "length")
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(completion_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + len(completion_ids)
    _check_routing(reply, _expected_routing(model, prompt_ids, completion_ids))


def test_streamed_chat_equals_the_plain_reply_and_ends_with_routing(client):
    messages = [{"role": "user", "content": "why is the sky blue?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == plain.choices[0].finish_reason
    last = chunks[-1]  # the include_usage chunk: no choices, usage and routing
    assert last.choices == [] and last.usage == plain.usage
    _check_routing(last)
    assert last.routing["experts"] == plain.routing["experts"]


def test_completion_with_stop_strings_and_seeded_sampling(client, hf):
    model, tokenizer = hf
    prompt = "the quick brown fox"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    prompt_ids = tokenizer(prompt)["input_ids"]  # BOS added, as for /v1/completions
    completion_ids = _greedy(model, tokenizer, prompt_ids, 40)
    assert full.object == "text_completion"
    assert full.choices[0].text == tokenizer.decode(completion_ids, skip_special_tokens=True)
    assert full.usage.prompt_tokens == len(prompt_ids)
    _check_routing(full, _expected_routing(model, prompt_ids, completion_ids))

    text = full.choices[0].text
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=["zz?", stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    def sample(seed):
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed, extra_body={"top_k": 20}
        )

    assert sample(7).choices[0].text == sample(7).choices[0].text
    assert len({sample(s).choices[0].text for s in range(4)}) > 1


def test_sixteen_concurrent_requests_are_all_answered(client):
    prompts = [f"question {'abcdefghijklmnop'[i]}" for i in range(16)]

    def ask(prompt):
        messages = [{"role": "user", "content": prompt}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, prompts + prompts[:4]))
    assert len(replies) == 20
    for reply in replies:
        assert reply.usage.completion_tokens >= 1
        _check_routing(reply)
    # serialised generations do not disturb each other: the same prompt gets the same greedy answer
    for a, b in zip(replies[:4], replies[16:], strict=True):
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.routing["experts"] == b.routing["experts"]


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/chat/completions", '{"model": "tiny-moe", "messages": [', 400, None, "invalid_json"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages", None),
        ("/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", None),
        ("/v1/chat/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", None),
        ("/v1/chat/completions", {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, None, None),
        ("/v1/chat/completions", {**GOOD, "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {**GOOD, "n": 2}, 400, "n", None),
        ("/v1/chat/completions", {**GOOD, "max_tokens": CONTEXT}, 400, "messages", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": "a" * CONTEXT}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 2}, 400, "logprobs", None),
        ("/v1/nowhere", GOOD, 404, None, None),
        ("/v1/chat/completions", {**GOOD, "routing": {"mode": "request", "top_k": 0}}, 400, "routing.top_k", None),
        ("/v1/chat/completions", {**GOOD, "routing": {"mode": "request", "top_k": 4}}, 400, "routing.top_k", None),
        ("/v1/chat/completions", {**GOOD, "routing": {"mode": "sequence"}}, 400, "routing.mode", None),
        ("/v1/chat/completions", {**GOOD, "routing": {"mode": "request", "mixing": "x"}}, 400, "routing.mixing", None),
        ("/v1/chat/completions", {**GOOD, "routing": {"experts": ["law", "art"]}}, 400, "routing.experts", None),
        ("/v1/chat/completions", {**GOOD, "routing": {"mode": "token", "experts": ["law"]}}, 400, "routing.mode", None),
        ("/v1/chat/completions", {**GOOD, "routing": {"mode": "token", "top_k": 1}}, 400, "routing.mode", None),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "routing": {"top_k": "1"}}, 400, "routing.top_k", None),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "routing": {"mod": "request"}}, 400, "routing.mod", None),
    ],
)
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, client, path, body, status, param, code):
    url = server[1]
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    good = client.chat.completions.create(**GOOD)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(**{**GOOD, "model": "gpt-4o"})
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(**GOOD, n=2)


def _long_prompt(client) -> str:
    """A prompt whose greedy answer runs to max_tokens (no end-of-sequence token): generation takes a while."""
    for prompt in ("abc", "hello there", "once upon a time", "zzz", "count to ten", "x y z", "one two"):
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=300, temperature=0)
        if reply.choices[0].finish_reason == "length":
            return prompt
    raise AssertionError("no prompt without an early end-of-sequence token: the test needs a long generation")


def _open_stream(url: str, prompt: str, max_tokens: int):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    stream = httpx.Client(timeout=30).stream("POST", url + "/v1/completions", json=body)
    response = stream.__enter__()
    lines = response.iter_lines()
    first = [next(line for line in lines if line.startswith("data:")) for _ in range(3)]
    return stream, lines, first


def test_client_disconnect_mid_stream_frees_the_slot(server, client):
    _, url, log = server
    prompt = _long_prompt(client)
    stream, _, first = _open_stream(url, prompt, CONTEXT - 64)
    assert all(json.loads(line[5:])["choices"][0]["finish_reason"] is None for line in first)
    stream.__exit__(None, None, None)  # hang up after three chunks
    start = time.monotonic()
    good = client.chat.completions.create(**GOOD)
    assert good.choices[0].finish_reason in ("stop", "length")
    deadline = time.monotonic() + 10
    while "slot freed" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert time.monotonic() - start < 10
    assert httpx.get(f"{url}/health").json()["busy"] is False


def test_chat_streams_answers_and_shows_expert_bar(out, monkeypatch):
    """In-process (a subprocess would spend most of its time importing torch); the serve tests cover the CLI."""
    from rich.console import Console

    from moemerge.tools.chat import chat

    lines = iter(["hello", "/reset", "what is law", "/quit", "never read"])

    def fake_input(*_):
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    chat(out, torch.device("cpu"), temperature=0, max_tokens=8, console=console)
    text = console.file.getvalue()
    assert text.count("moe ›") == 2 and "conversation forgotten" in text
    assert text.count("shares sum to 2") == 2
    for name in NAMES:
        assert name in text
    assert next(lines) == "never read"


class _ByteTokenizer:
    """Token i is byte i: multi-byte characters span tokens, as with byte-level BPE."""

    def decode(self, ids, **_):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "text, stops, pieces, final",
    [
        ("héllo", [], ["h", "", "é", "l", "l", "o"], "héllo"),  # é is two bytes: nothing until it is whole
        ("say STOP now", ["STOP"], ["s", "a", "y", " ", "", "", "", "", ""], "say "),  # "S", "ST", "STO" held
        ("a STOx b", ["STOP"], ["a", " ", "", "", "", "STOx", " ", "b", ""], "a STOx b"),  # a false start is released
        ("abcabd", ["abd", "bca"], ["", "", "a", "", ""], "a"),  # "a", "ab", "bc" held; "bca" ends it
    ],
)
def test_text_stream_holds_back_partial_characters_and_stop_strings(text, stops, pieces, final):
    stream = TextStream(_ByteTokenizer(), stops)
    got = []
    for byte in text.encode():
        got.append(stream.add(byte))
        if stream.stopped:
            break
    got.append(stream.finish())
    assert "".join(got) == stream.text == final
    assert got[: len(pieces)] == pieces


def test_tokenizer_without_chat_template_gets_role_content_lines(hf):
    model, _ = hf
    tokenizer = tiny_tokenizer()  # no chat template
    engine = Engine(model, tokenizer, NAMES)
    assert not engine.has_chat_template
    ids = engine.chat_ids([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    expected = tokenizer("user: hi\nassistant: yo\nassistant:", add_special_tokens=True)["input_ids"]
    assert ids == expected
    assert FALLBACK_CHAT_TEMPLATE.startswith("{{ bos_token }}")


def _mean_probability_choice(model, tokenizer, text: str) -> int:
    """The expert with the highest router probability averaged over the text's tokens (BOS left out) and layers."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        logits = torch.stack(model(ids, output_router_logits=True).router_logits)[:, 1:]
    return int(torch.softmax(logits, dim=-1).mean(dim=(0, 1)).argmax())


def test_request_routing_runs_only_the_chosen_expert(client, hf, out):
    """Top-1 request routing: the reply is the greedy answer of the chosen expert's own dense model."""
    model, tokenizer = hf
    question = "what is the law"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
    prompt_ids = _chat_ids(tokenizer, messages)
    dense = [AutoModelForCausalLM.from_pretrained(out.parent / f"e{i}").eval() for i in range(3)]
    answers = [_greedy(expert, tokenizer, prompt_ids, 24) for expert in dense]
    assert len({tuple(a) for a in answers}) > 1  # the experts answer differently: the test can tell them apart
    chosen = _mean_probability_choice(model, tokenizer, question)  # decided on the user's message alone
    body = {"routing": {"mode": "request", "top_k": 1}}
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, extra_body=body
    )
    assert reply.choices[0].message.content == tokenizer.decode(answers[chosen], skip_special_tokens=True)
    routing = reply.routing
    assert routing["mode"] == "request" and routing["decided_by"] == "router" and routing["mixing"] == "router"
    assert routing["chosen"] == {NAMES[chosen]: 1.0}
    assert reply.expert == routing["top_expert"] == NAMES[chosen] and routing["top_k"] == 1
    assert {n: routing["experts"][n]["completion"] for n in NAMES} == {n: float(n == NAMES[chosen]) for n in NAMES}
    assert 0 < routing["routing_duration"] < 5
    for forced in (1, 2):  # forcing an expert: that expert's answer, whatever the router thinks
        body = {"routing": {"experts": [NAMES[forced]]}}
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, extra_body=body
        )
        assert reply.choices[0].message.content == tokenizer.decode(answers[forced], skip_special_tokens=True)
        assert reply.routing["decided_by"] == "forced" and reply.routing["chosen"] == {NAMES[forced]: 1.0}
    token = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert token.routing["mode"] == "token" and "chosen" not in token.routing


def test_request_routing_top2_streams_and_reports_the_decision(client, hf):
    model, tokenizer = hf
    prompt = "the quick brown fox"
    body = {"routing": {"mode": "request", "top_k": 2, "mixing": "fixed"}}
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body=body)
    )
    routing = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].routing
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = torch.stack(model(ids, output_router_logits=True).router_logits)[:, 1:]
    mean = torch.softmax(logits, dim=-1).mean(dim=(0, 1))
    top = mean.topk(2)
    expected = {NAMES[int(i)]: float(v / top.values.sum()) for i, v in zip(top.indices, top.values, strict=True)}
    assert list(routing["chosen"]) == list(expected)
    assert routing["chosen"] == pytest.approx(expected)
    assert routing["mixing"] == "fixed" and routing["top_k"] == 2  # fixed mixing: both experts for every token
    other = next(n for n in NAMES if n not in expected)
    assert routing["experts"][other] == {"prompt": 0.0, "completion": 0.0}


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--routing", "sequence"], "--routing"),
        (["--routing", "request", "--request-top-k", "0"], "--request-top-k"),
        (["--routing", "request", "--request-top-k", "4"], "--request-top-k"),
        (["--routing", "request", "--request-mixing", "avg"], "--request-mixing"),
    ],
)
def test_serve_bad_routing_flags_get_one_line_error(out, flags, words):
    command = [CLI, "serve", str(out), "--port", str(_free_port()), "--device", "cpu", *flags]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + words), run.stderr


def test_chat_with_a_forced_expert_says_so(out, monkeypatch):
    from rich.console import Console

    from moemerge.tools.chat import chat
    from moemerge.tools.request_routing import RequestRouting

    lines = iter(["hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda *_: next(lines))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    chat(
        out,
        torch.device("cpu"),
        temperature=0,
        max_tokens=8,
        console=console,
        routing=RequestRouting("request", 1, experts=("law",)),
    )
    text = console.file.getvalue()
    assert "request routing top-1" in text and "request → law 1.00 (forced)" in text
    assert "(top-1: shares sum to 1)" in text


def test_waiting_requests_are_served_in_arrival_order(server, client):
    """A long generation holds the slot while four short ones arrive one after another and queue (each seen on
    /health before the next is sent); they are answered first come, first served."""
    _, url, _ = server
    prompt = _long_prompt(client)
    patient = client.with_options(timeout=600)  # the last one waits for all the others on a loaded machine
    finished: list[int] = []
    most_waiting = 0

    def ask(number: int) -> None:
        tokens = CONTEXT - 64 if number == 0 else 32
        patient.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0)
        finished.append(number)

    with ThreadPoolExecutor(5) as pool:
        replies = []
        for number in range(5):
            replies.append(pool.submit(ask, number))
            # the next request is sent once this one holds the slot (the first) or is queued (the others), so
            # the arrival order is known however fast the machine is
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not replies[0].done():
                health = httpx.get(f"{url}/health").json()
                most_waiting = max(most_waiting, health["waiting"])
                if (health["busy"] and number == 0) or health["waiting"] >= number > 0:
                    break
        for reply in replies:
            reply.result()
    assert most_waiting >= 3, f"at most {most_waiting} requests queued: the test needs a longer first generation"
    assert finished == [0, 1, 2, 3, 4]


def _signal_stops_a_running_stream_and_exits_zero(process, url: str, prompt: str, sig: signal.Signals) -> None:
    """A stream is running when `sig` arrives: its client gets the shutdown error and [DONE], the process exits 0."""
    stream, lines, _ = _open_stream(url, prompt, CONTEXT - 64)
    process.send_signal(sig)
    rest = [line for line in lines if line.startswith("data:")]
    stream.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in rest[-2]
    assert process.wait(timeout=10) == 0


def test_sigterm_stops_a_running_stream_and_exits_zero(out, client, tmp_path):
    """On a server of its own (the module's is shut down by the SIGINT test)."""
    prompt = _long_prompt(client)
    process, url = _start_server(out, tmp_path / "server.log")
    try:
        _signal_stops_a_running_stream_and_exits_zero(process, url, prompt, signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigint_stops_a_running_stream_and_exits_zero(server, client):
    """Last: shuts the module's server down."""
    process, url, _ = server
    _signal_stops_a_running_stream_and_exits_zero(process, url, _long_prompt(client), signal.SIGINT)
