"""Talk to a merged MoE: the generation engine (shared with `moemerge chat`) and an OpenAI-compatible server.

The engine is plain torch + transformers: a decoding loop over a KV cache that reads every layer's router
logits at every step, so each reply can say which experts produced it. FastAPI and uvicorn (the `serve`
extra) are imported only when the server is built, so `moemerge chat` and the merge itself do not need them.

Routing, as reported in every reply (`routing` object):
- prompt share of expert e: the fraction of (layer, prompt token) pairs whose router top-k includes e, over
  every token the model reads (chat template and BOS included: the `usage.prompt_tokens` tokens);
- completion share of expert e: the same over (layer, generated token) pairs, where a generated token's
  routing is that of the forward pass that produced it (the position before it: the last prompt token for the
  first generated token). An end-of-sequence token the model generated counts, as in `usage`.
Each token picks top-k experts per layer, so the shares of all experts sum to top-k, not 1.
`top_expert` is the expert with the largest completion share (ties: larger prompt share, then lower index).

Request routing (`--routing request` or a request's `routing` object; moemerge/tools/request_routing.py): one decision
per request, from the routers' mean probabilities over the request's text, then every layer runs only the chosen
experts for the prompt and every generated token. The shares then count the experts that ran, `top_k` is how
many ran per token, `top_expert` is the decision's first expert, and `chosen`, `decided_by` and `mixing` say
what was decided; `routing_duration` includes the decision's router pass. `mode` says which routing decided.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and
# `Request` is imported inside create_app so that this module does not need FastAPI.

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from moemerge.errors import MoemergeError
from moemerge.tools.request_routing import (
    Decision,
    RequestRouting,
    RoutingPlan,
    RoutingSettingsError,
    checked_for_cli,
    decide,
    decision_text,
    experts_run,
    restricted,
)
from moemerge.tools.routing import load_moe, tokenize

log = logging.getLogger("moemerge.tools.serve")

# Used when the tokenizer has no chat template of its own: one "role: content" line per message.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class RequestError(Exception):
    """A request the server refuses: becomes OpenAI's error JSON with a 4xx status."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Delta:
    """New completion text, ready to show (partial characters and possible stop-string starts held back)."""

    text: str


@dataclass
class Finished:
    """The last event of a generation."""

    text: str  # the whole completion
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    routing: dict[str, Any]

    @property
    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    @property
    def expert(self) -> str:
        return self.routing["top_expert"]


class TextStream:
    """Token ids in, text out: decodes incrementally and holds back half-decoded characters and stop-string starts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last time, as context for the next token
        self.text = ""  # decoded so far (cut at a stop string once one is seen)
        self.sent = 0  # text[:sent] has been handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(before) :]
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._held()
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def _held(self) -> int:
        """Length of the longest end of the unsent text that begins some stop string."""
        unsent = self.text[self.sent :]
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(unsent)), longest, -1):
                if unsent.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class Engine:
    """One model; generation is a Python generator of Delta events ending with one Finished event.

    Not thread-safe: callers run one generation at a time (the server serialises requests)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        names: list[str],
        routing: RequestRouting | None = None,
    ) -> None:
        self.model, self.tokenizer, self.names = model, tokenizer, names
        self.routing = checked_for_cli(routing or RequestRouting(), names)  # the default for every request
        config = model.config
        self.top_k = config.num_experts_per_tok
        self.layers = config.num_hidden_layers
        self.context_length = int(config.max_position_embeddings)
        self.device = model.device
        # transformers 5 renamed past_key_values to cache and num_logits_to_keep to logits_to_keep
        accepted = inspect.signature(model.forward).parameters
        self._forward_args: dict[str, Any] = {"use_cache": True, "output_router_logits": True}
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in accepted), None)
        if keep:
            self._forward_args[keep] = 1
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        generation = model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else []
        eos = set(eos if isinstance(eos, list) else [eos])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        # The output's generation_config.json may set sampling defaults; otherwise OpenAI's (temperature 1, top_p 1).
        self.defaults = {k: v for k, v in generation.to_diff_dict().items() if k in ("temperature", "top_p", "top_k")}
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, out: Path, device: torch.device, routing: RequestRouting | None = None) -> "Engine":
        return cls(*load_moe(out, device), routing)

    # -- prompts -----------------------------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template (or FALLBACK_CHAT_TEMPLATE), with a generation prompt, as token ids."""
        template = None if self.has_chat_template else FALLBACK_CHAT_TEMPLATE
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # a template may raise on a role order it does not support
            raise RequestError(f"the model's chat template refused these messages: {exc}", "messages") from exc
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, prompt: str) -> list[int]:
        """A raw prompt, with the special tokens the tokenizer adds (BOS), as vLLM does for /v1/completions."""
        return self.tokenizer(prompt)["input_ids"]

    def params(self, **given: Any) -> SamplingParams:
        """SamplingParams from request values (None: the model's default, else OpenAI's)."""
        values = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        stop = values.get("stop") or []
        values["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return SamplingParams(**values)

    def check(self, ids: list[int], params: SamplingParams, param: str = "messages") -> None:
        """Refuses prompts that leave no room in the context, as OpenAI does."""
        if not ids:
            raise RequestError("the prompt is empty", param)
        limit = self.context_length
        if params.max_tokens is None and len(ids) >= limit:
            problem = f"your {param} resulted in {len(ids)} tokens, which leaves no room for a completion"
            fix = f"the {param}"
        elif params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            problem = (
                f"you requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the {param}, "
                f"{params.max_tokens} in the completion)"
            )
            fix = f"the {param} or completion"
        else:
            return
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, {problem}. "
            f"Please reduce the length of {fix}.",
            param,
            "context_length_exceeded",
        )

    # -- routing -----------------------------------------------------------------------------------------------

    def request_routing(self, given: dict[str, Any] | None) -> RequestRouting:
        """The engine's routing with a request's `routing` fields over it; naming experts implies request mode
        and a top_k of their number."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        if "experts" in given:
            given = {"mode": "request", "top_k": len(given["experts"]), **given, "experts": tuple(given["experts"])}
        settings = dataclasses.replace(self.routing, **given)
        try:
            if settings.mode == "token" and {"top_k", "mixing"} & set(given):
                raise RoutingSettingsError("top_k and mixing are for request routing; add mode request", "mode")
            return settings.checked(self.names)
        except RoutingSettingsError as exc:
            raise RequestError(exc.message, f"routing.{exc.field}", "invalid_routing") from None

    def decide(self, plan: RoutingPlan) -> Decision | None:
        """None for token routing; else the request's experts, forced or from one router pass over its text."""
        settings = plan.settings
        if settings.mode == "token":
            return None
        if settings.experts:
            return Decision.forced([self.names.index(n) for n in settings.experts], settings.mixing)
        started = time.perf_counter()
        ids, real = tokenize(self.tokenizer, plan.text or " ")
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), **{**self._forward_args, "use_cache": False})
        logits = torch.stack([layer.float() for layer in out.router_logits])[:, real.to(self.device)]
        decision = decide(logits, settings.top_k, settings.mixing)
        return dataclasses.replace(decision, seconds=time.perf_counter() - started)

    # -- generation --------------------------------------------------------------------------------------------

    def generate(
        self, ids: list[int], params: SamplingParams, routing: RoutingPlan | None = None
    ) -> Iterator[Delta | Finished]:
        """Decode token by token; yields Delta events, then one Finished. Call check() first.

        Request routing decides first (inside the generator, so on the caller's generation slot)."""
        plan = routing or RoutingPlan(self.routing, self.tokenizer.decode(ids, skip_special_tokens=True))
        decision = self.decide(plan)
        with restricted(self.model, decision):
            yield from self._generate(ids, params, decision)

    def _generate(
        self, ids: list[int], params: SamplingParams, decision: Decision | None
    ) -> Iterator[Delta | Finished]:
        budget = self.context_length - len(ids)
        max_tokens = min(params.max_tokens or budget, budget)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        cache = _new_cache(self.model.config)
        stream = TextStream(self.tokenizer, params.stop)
        counts = _RoutingCounts(self.layers, len(self.names), self.top_k, self.device, decision)
        inputs = torch.tensor([ids], device=self.device)
        generated = 0
        finish = "length"
        while generated < max_tokens:
            token = self._step(inputs, cache, counts, params, generator)
            generated += 1
            if token in self.eos_ids:
                finish = "stop"
                break
            delta = stream.add(token)
            if delta:
                yield Delta(delta)
            if stream.stopped:
                finish = "stop"
                break
            inputs = torch.tensor([[token]], device=self.device)
        tail = stream.finish()
        if tail:
            yield Delta(tail)
        yield Finished(stream.text, finish, len(ids), generated, counts.report(self.names))

    def _step(self, inputs, cache, counts, params: SamplingParams, generator: torch.Generator) -> int:
        with torch.inference_mode():
            out = self.model(input_ids=inputs, **{self._cache_arg: cache}, **self._forward_args)
            counts.add(out.router_logits, prompt=counts.prompt_tokens == 0)
            return _sample(out.logits[0, -1], params, generator)


def _new_cache(config) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4 builds its layers lazily
        return DynamicCache()


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else top-k, then top-p (nucleus), then a draw from the seeded CPU generator."""
    if params.temperature <= 1e-5:
        return int(logits.argmax())
    logits = logits.float().cpu() / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _RoutingCounts:
    """Per expert: how many (layer, token) pairs had it in their top-k, for the prompt and for generated tokens."""

    def __init__(
        self, layers: int, experts: int, top_k: int, device: torch.device, decision: Decision | None = None
    ) -> None:
        self.layers, self.top_k, self.decision = layers, top_k, decision
        self.ran_per_token = top_k  # experts each (layer, token) ran: top_k, or fewer under a request decision
        self.prompt = torch.zeros(experts, dtype=torch.long, device=device)
        self.completion = torch.zeros(experts, dtype=torch.long, device=device)
        self.prompt_tokens = self.completion_tokens = 0
        self.seconds = decision.seconds if decision else 0.0

    def add(self, router_logits: tuple[torch.Tensor, ...], prompt: bool) -> None:
        start = time.perf_counter()
        choices = experts_run(self.decision, torch.stack(router_logits).float(), self.top_k)  # [layers, tokens, k]
        experts = self.prompt.numel()
        self.ran_per_token = choices.shape[-1]
        if prompt:
            self.prompt += torch.bincount(choices.reshape(-1), minlength=experts)
            self.prompt_tokens = choices.shape[1]
        # the last position's routing is that of the pass that produces the next token
        self.completion += torch.bincount(choices[:, -1].reshape(-1), minlength=experts)
        self.completion_tokens += 1
        self.seconds += time.perf_counter() - start

    def report(self, names: list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        prompt = (self.prompt.cpu().double() / max(1, self.layers * self.prompt_tokens)).tolist()
        completion = (self.completion.cpu().double() / max(1, self.layers * self.completion_tokens)).tolist()
        top = max(range(len(names)), key=lambda i: (completion[i], prompt[i], -i))
        if self.decision is not None:
            top = self.decision.experts[0]
        self.seconds += time.perf_counter() - start
        return {
            "mode": "token" if self.decision is None else "request",
            **({"decided_by": "router"} if self.decision is None else self.decision.report(names)),
            "experts": {n: {"prompt": p, "completion": c} for n, p, c in zip(names, prompt, completion, strict=True)},
            "top_expert": names[top],
            "top_k": self.ran_per_token,
            "layers": self.layers,
            "routing_duration": self.seconds,
        }


# -- the HTTP API ----------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # wrong JSON types are errors (no "0.5" for 0.5); fields OpenAI has and we do not use are ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*")
    @classmethod
    def _real_text(cls, value: Any) -> Any:
        """JSON can carry a lone surrogate escape (\\ud800), which no tokenizer can encode: a 400, not a 500."""
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone surrogate escape (such as \\ud800), which is not text") from None
        return value


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class RoutingBody(_Strict):
    """A request's `routing` object (moemerge's own field): each value overrides the server's default."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt key would silently route otherwise
    mode: str | None = None  # "token" or "request"
    top_k: int | None = None  # experts per request (request mode)
    mixing: str | None = None  # "router" or "fixed" (request mode, top_k > 1)
    experts: list[str] | None = None  # force these experts (implies request mode and top_k = their number)


# Accepted so that clients sending them get a clear 400 instead of silently different output.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "tools",
    "functions",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "best_of",
    "echo",
    "suffix",
)


def _is_neutral(name: str, value: Any) -> bool:
    """Whether an unsupported parameter holds a value that changes nothing (clients often send defaults)."""
    if value is None or value is False or (isinstance(value, str | list | dict) and not value):
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == (1 if name == "best_of" else 0)
    return False


class _Request(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    response_format: Any = None
    routing: RoutingBody | None = None

    def sampling(self, engine: Engine) -> SamplingParams:
        if self.n != 1:
            raise RequestError(f"n={self.n}: this server returns exactly one choice per request (n=1)", "n")
        for name in UNSUPPORTED:
            if not _is_neutral(name, getattr(self, name)):
                raise RequestError(f"{name} is not supported by moemerge serve", name, "unsupported_parameter")
        if self.response_format not in (None, {"type": "text"}):
            raise RequestError("response_format: only text is supported", "response_format", "unsupported_parameter")
        top_k = self.top_k if self.top_k is None else max(0, self.top_k)
        return engine.params(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=top_k,
            stop=self.stop,
            seed=self.seed,
        )


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(_Request):
    prompt: str


def _plain_messages(messages: list[Message]) -> list[dict[str, str]]:
    plain = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise RequestError("only text content parts are supported", f"messages.{i}.content")
            content = "".join(part.text for part in content)
        plain.append({"role": message.role, "content": content or ""})
    return plain


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Server:
    """The FastAPI side: one Engine, one generation at a time.

    Requests are serialised by an asyncio.Lock held for a whole generation (a streamed reply keeps its slot
    until its last token); waiting requests queue in FIFO order. Every model call runs on one dedicated worker
    thread, so the event loop stays free for /health, errors and disconnect checks, and all torch work happens
    on a single thread. Batching several requests would need padding and per-request caches; on the models
    moemerge builds a server like vLLM does that far better (see the README)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.lock = asyncio.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemerge-generate")
        self.waiting = 0
        self.stopping = False  # set on SIGINT/SIGTERM: generations end at their next token
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                "model",
                "model_not_found",
                404,
            )

    async def events(
        self, request, ids: list[int], params: SamplingParams, routing: RoutingPlan | None = None
    ) -> AsyncIterator[Delta | Finished]:
        """Waits for the slot, then runs the generation on the worker thread, one token per step.

        Between steps it checks whether the client is gone; if so (or if this task is cancelled) the slot is
        freed at once and the generator is closed on the worker thread after the step in flight."""
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        steps = self.engine.generate(ids, params, routing)
        produced = 0
        finished = False
        try:
            while True:
                if self.stopping:
                    raise RequestError("the server is shutting down", status=503, type_="server_error")
                if await request.is_disconnected():
                    return
                event = await loop.run_in_executor(self.executor, next, steps, None)
                if event is None:
                    return
                finished = isinstance(event, Finished)
                produced += isinstance(event, Delta)
                yield event
        finally:
            self.executor.submit(steps.close)
            self.lock.release()
            if not finished:
                log.info("slot freed: generation stopped after %d text pieces (client gone or shutdown)", produced)

    def routing_plan(self, body: "_Request", text: str) -> RoutingPlan:
        given = body.routing.model_dump() if body.routing is not None else None
        return RoutingPlan(self.engine.request_routing(given), text)

    def prepare_chat(self, body: ChatRequest) -> tuple[list[int], SamplingParams]:
        self.check_model(body.model)
        params = body.sampling(self.engine)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            params.max_tokens = body.max_completion_tokens
        ids = self.engine.chat_ids(_plain_messages(body.messages))
        self.engine.check(ids, params, "messages")
        return ids, params

    def prepare_completion(self, body: CompletionRequest) -> tuple[list[int], SamplingParams]:
        self.check_model(body.model)
        params = body.sampling(self.engine)
        ids = self.engine.text_ids(body.prompt)
        self.engine.check(ids, params, "prompt")
        return ids, params


def _reply_fields(final: Finished) -> dict[str, Any]:
    return {"usage": final.usage, "routing": final.routing, "expert": final.expert}


def create_app(engine: Engine, model_name: str):
    """The FastAPI application serving `engine` as `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, model_name)
    app = FastAPI(title="moemerge serve", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request: {first.get('msg')}"
            return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), status_code=400)
        param = ".".join(loc) or None
        message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": server.lock.locked(), "waiting": server.waiting}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "moemerge",
            "max_model_len": engine.context_length,
            "experts": engine.names,
            "experts_per_token": engine.top_k,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        ids, params = server.prepare_chat(body)
        routing = server.routing_plan(body, decision_text(_plain_messages(body.messages)))
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": model_name, "system_fingerprint": None}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return _sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

            async def stream():
                yield chunk({"role": "assistant", "content": ""})
                async with contextlib.aclosing(server.events(request, ids, params, routing)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            yield chunk({"content": event.text})
                            continue
                        yield chunk({}, event.finish_reason, **_reply_fields(event))
                        if include_usage:
                            tail = {**head, "object": "chat.completion.chunk", "choices": [], **_reply_fields(event)}
                            yield _sse(tail)

            return _sse_response(StreamingResponse, stream())
        final = await _collect(server.events(request, ids, params, routing))
        message = {"role": "assistant", "content": final.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": final.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], **_reply_fields(final)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids, params = server.prepare_completion(body)
        routing = server.routing_plan(body, body.prompt)
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str, finish: str | None = None, **extra: Any) -> str:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                return _sse({**head, "choices": [choice], **extra})

            async def stream():
                async with contextlib.aclosing(server.events(request, ids, params, routing)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            yield chunk(event.text)
                            continue
                        yield chunk("", event.finish_reason, **_reply_fields(event))
                        if include_usage:
                            yield _sse({**head, "choices": [], **_reply_fields(event)})

            return _sse_response(StreamingResponse, stream())
        final = await _collect(server.events(request, ids, params, routing))
        choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": final.finish_reason}
        return {**head, "choices": [choice], **_reply_fields(final)}

    return app


async def _collect(events: AsyncIterator[Delta | Finished]) -> Finished:
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Finished):
                return event
    raise RequestError("the client disconnected", status=499)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse_response(response_class, body: AsyncIterator[str]):
    """Server-sent events ending with `data: [DONE]`; a failure mid-stream becomes an error event first."""

    async def framed():
        async with contextlib.aclosing(body):
            try:
                async for piece in body:
                    yield piece
            except RequestError as exc:  # headers are sent: report in-band, as OpenAI does
                yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
            except Exception as exc:
                log.exception("generation failed mid-stream")
                yield _sse(error_body(f"{type(exc).__name__}: {exc}", "server_error"))
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return response_class(framed(), media_type="text/event-stream", headers=headers)


def _uvicorn_server(config, server: Server):
    import uvicorn

    class QuietExitServer(uvicorn.Server):
        """On SIGINT/SIGTERM: running generations stop at their next token (their clients get a 503 error), uvicorn
        shuts down gracefully, and the process exits with 0. (uvicorn itself re-raises the signal after shutting
        down, which would end the process with KeyboardInterrupt, 130, or SIGTERM, 143.)"""

        def handle_exit(self, sig, frame) -> None:
            server.stopping = True
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    return QuietExitServer(config)


def _check_can_listen(host: str, port: int) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise MoemergeError(f"--host {host}: {getattr(exc, 'strerror', None) or exc}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            raise MoemergeError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port") from None


def serve(
    out: Path,
    host: str,
    port: int,
    device: torch.device,
    model_name: str | None,
    routing: RequestRouting | None = None,
) -> None:
    """Load OUT and serve it until SIGINT/SIGTERM; returns normally after a graceful shutdown (exit code 0)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MoemergeError("moemerge serve needs FastAPI and uvicorn: pip install 'moemerge[serve]'") from None
    log.setLevel(logging.INFO)  # disconnects and shutdowns are worth a line beside uvicorn's access log
    _check_can_listen(host, port)  # before loading the model, which may take minutes
    engine = Engine.load(out, device, routing)
    name = model_name or out.resolve().name
    app = create_app(engine, name)
    template = "its chat template" if engine.has_chat_template else "a plain 'role: content' chat template"
    log.info(
        "serving %s as %r on http://%s:%d/v1 (%s; experts %s; top-%d; %s routing; context %d tokens; %s)",
        out,
        name,
        host,
        port,
        device,
        ", ".join(engine.names),
        engine.top_k,
        engine.routing.mode if engine.routing.mode == "token" else f"request top-{engine.routing.top_k}",
        engine.context_length,
        template,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    try:
        _uvicorn_server(config, app.state.server).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down gracefully
        pass
    finally:
        app.state.server.executor.shutdown(wait=True, cancel_futures=True)
