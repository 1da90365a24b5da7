"""The generation engine behind `moemerge serve` and `moemerge chat`: a decoding loop over a KV cache that
reads every layer's router logits at every step, so each reply can say which experts produced it.

Plain torch + transformers, no transport: the HTTP server (tools/serve.py) and the terminal chat
(tools/chat.py) are adapters around it. A request the engine cannot run raises RequestRefused, a library
error with the parameter at fault; the server turns it into OpenAI's 400 reply, chat into a red line.

Routing, as reported in every reply (`routing` object):
- prompt share of expert e: the fraction of (layer, prompt token) pairs whose router top-k includes e, over the
  layers that route (`layers` counts them; a dense layer does not route, moemerge/tools/moe_layers.py) and
  every token the model reads (chat template and BOS included: the `usage.prompt_tokens` tokens);
- completion share of expert e: the same over (layer, generated token) pairs, where a generated token's
  routing is that of the forward pass that produced it (the position before it: the last prompt token for the
  first generated token). An end-of-sequence token the model generated counts, as in `usage`.
Each token picks top-k experts per layer, so the shares of all experts sum to top-k, not 1.
`top_expert` is the expert with the largest completion share (ties: larger prompt share, then lower index).

Request routing (the engine's `RequestRouting(mode="request")` or a request's `routing` object;
moemerge/tools/request_routing.py): one decision per request, from the routers' mean probabilities over the
request's text, then every layer runs only the chosen experts for the prompt and every generated token. The
shares then count the experts that ran, `top_k` is how many ran per token, `top_expert` is the decision's first
expert, and `chosen`, `decided_by` and `mixing` say what was decided; `routing_duration` includes the
decision's router pass. `mode` says which routing decided.
"""

from __future__ import annotations

import dataclasses
import inspect
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from moemerge.errors import MoemergeError, OptionError
from moemerge.tools.moe_layers import moe_layers
from moemerge.tools.reply_routing import ReplyRouting
from moemerge.tools.request_routing import (
    Decision,
    RequestRouting,
    RoutingPlan,
    RoutingSettingsError,
    decide,
    restricted,
)
from moemerge.tools.routing import load_moe, tokenize
from moemerge.tools.text_stream import TextStream

# Used when the tokenizer has no chat template of its own: one "role: content" line per message.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# A prompt longer than this many characters per token of context is refused before it is tokenized (which takes
# seconds for megabytes): an average token of real text is a few characters, so such a prompt cannot fit.
CHARS_PER_TOKEN = 32
SEED_RANGE = (-(2**63), 2**64 - 1)  # the sampling seeds torch.Generator.manual_seed takes


def check_seed(seed: int | None) -> None:
    """Refuses a sampling seed torch's generator cannot take, naming the option (before a model is loaded)."""
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise OptionError(
            "{seed} {value}: a sampling seed is a whole number from {low} to {high}",
            value=seed,
            low=SEED_RANGE[0],
            high=SEED_RANGE[1],
        )


class RequestRefused(MoemergeError):
    """A request the engine will not run (prompt too long, a template that refuses the messages, bad routing
    settings): `param` names the request field at fault, `code` is a short machine-readable reason."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


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
        self.routing = (routing or RequestRouting()).checked(names)  # the default for every request
        config = model.config
        self.top_k = config.num_experts_per_tok
        self.moe = moe_layers(model)
        self.layers = len(self.moe.routing)  # the layers that route: shares are over these
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
    def load(cls, out: Path, device: torch.device, routing: RequestRouting | None = None) -> Engine:
        return cls(*load_moe(out, device), routing)

    # -- prompts -----------------------------------------------------------------------------------------------

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt (or messages' content, all together) that is tokenized, in characters."""
        return CHARS_PER_TOKEN * self.context_length

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise RequestRefused(
                f"Your {param} holds {chars} characters; this server tokenizes at most {self.max_prompt_chars} "
                f"({CHARS_PER_TOKEN} per token of the model's {self.context_length}-token context). "
                f"Please reduce the length of the {param}.",
                param,
                "context_length_exceeded",
            )

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template (or FALLBACK_CHAT_TEMPLATE), with a generation prompt, as token ids."""
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        template = None if self.has_chat_template else FALLBACK_CHAT_TEMPLATE
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # a template may raise on a role order it does not support
            raise RequestRefused(f"the model's chat template refused these messages: {exc}", "messages") from exc
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, prompt: str) -> list[int]:
        """A raw prompt, with the special tokens the tokenizer adds (BOS), as vLLM does for /v1/completions."""
        self._check_chars(len(prompt), "prompt")
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
            raise RequestRefused("the prompt is empty", param)
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
        raise RequestRefused(
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
        implied: dict[str, Any] = {}  # what naming experts implies; errors name only fields the request sent
        if "experts" in given:
            given["experts"] = tuple(given["experts"])
            implied = {"mode": "request", "top_k": len(given["experts"])}
        settings = dataclasses.replace(self.routing, **{**implied, **given})
        try:
            if given.get("experts") == ():
                raise RoutingSettingsError(
                    "an empty list forces no expert; name one or more, or leave it out", "experts"
                )
            if settings.mode == "token" and {"top_k", "mixing"} & set(given):
                raise RoutingSettingsError("top_k and mixing are for request routing; add mode request", "mode")
            return settings.checked(self.names)
        except RoutingSettingsError as exc:
            raise RequestRefused(exc.message, f"routing.{exc.field}", "invalid_routing") from None

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
        logits = self.moe.routing_logits(out.router_logits).float()[:, real.to(self.device)]
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
        counts = ReplyRouting(self.layers, len(self.names), self.top_k, self.device, decision)
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
            counts.add(self.moe.routing_logits(out.router_logits), prompt=counts.prompt_tokens == 0)
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
        drop[0] = False  # the most likely token stays even where top_p rounds to 0 in float32 (1e-50)
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
