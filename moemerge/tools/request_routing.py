"""One routing decision per request (the lmoe / Herd / AnyMoE-sequence way), made by the MoE's own routers.

Decision: every router's softmax probabilities, averaged over the request's real tokens and over the routing
layers (moemerge.tools.moe_layers: a dense layer does not route), give one score per expert; the top-k scores are
the request's experts, their renormalised scores its weights. Generation under the decision: a forward hook on
every MoE block's router (transformers 5's `...TopKRouter` modules, which return `(logits, weights, indices)`)
replaces the weights and indices, so every token in every layer runs only the chosen experts, for the prompt and
every generated token:
- k = 1: exactly the chosen expert's MLP, weight 1 (the dense model made of that expert);
- mixing "router": the router's own choice among the chosen experts (its logits with the others at -inf, then
  the family's top-k and renormalisation), at most the model's experts_per_token per token;
- mixing "fixed" (Herd-style): all chosen experts for every token, with the decision's weights.
In the first and last case a shared expert the merge added (Qwen2-MoE) is switched off and the routed experts
get their full scale back, so these hold with a shared expert too.
The raw router logits stay the router's first output, so `output_router_logits` still shows what the routers
would have chosen.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moemerge.errors import MoemergeError, OptionError
from moemerge.tools.moe_layers import MoeLayers, moe_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODES = ("token", "request")
MIXINGS = ("router", "fixed")


class RoutingSettingsError(OptionError):
    """A bad routing setting: `field` is which one (mode, top_k, mixing, experts), the option it names is
    `routing.<field>` (the CLI's flag, an HTTP request's parameter), `message` what is wrong with it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{{routing.{field}}}: {{message}}", message=message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class RequestRouting:
    """How requests are routed: `token` (every token, every layer, as the model was built) or `request`.

    `experts` forces the named experts (request mode; debugging); `top_k` is how many experts a request gets."""

    mode: str = "token"
    top_k: int = 1
    mixing: str = "router"
    experts: tuple[str, ...] = ()

    def checked(self, names: list[str]) -> RequestRouting:
        """Itself, or RoutingSettingsError naming the bad field and what is allowed."""
        if self.mode not in MODES:
            raise RoutingSettingsError(f"unknown routing mode {self.mode!r}; use token or request", "mode")
        if self.mixing not in MIXINGS:
            raise RoutingSettingsError(f"unknown mixing {self.mixing!r}; use router or fixed", "mixing")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(names):
            raise RoutingSettingsError(
                f"top_k {self.top_k!r}: a request gets 1 to {len(names)} experts (this model has {len(names)})", "top_k"
            )
        unknown = [name for name in self.experts if name not in names]
        if unknown:
            raise RoutingSettingsError(f"unknown expert {unknown[0]!r}; this model has {', '.join(names)}", "experts")
        if len(set(self.experts)) != len(self.experts):
            raise RoutingSettingsError("an expert is named twice", "experts")
        if self.experts and self.mode != "request":
            raise RoutingSettingsError("forcing experts needs routing mode request", "mode")
        if self.experts and self.top_k != len(self.experts):
            raise RoutingSettingsError(f"top_k {self.top_k} but {len(self.experts)} experts named", "top_k")
        return self


@dataclass(frozen=True)
class Decision:
    """The experts a request runs on, with their weights (sum 1), and who chose them."""

    experts: tuple[int, ...]
    weights: tuple[float, ...]
    decided_by: str  # "router" (averaged router probabilities) or "forced" (named in the request)
    mixing: str = "router"
    seconds: float = 0.0  # time the decision took

    @classmethod
    def forced(cls, experts: list[int], mixing: str = "router") -> Decision:
        """Named experts with equal weights: no router pass."""
        return cls(tuple(experts), tuple(1 / len(experts) for _ in experts), "forced", mixing)

    @property
    def same_for_every_token(self) -> bool:
        """One expert, or fixed mixing: every token runs all the chosen experts, with the same weights."""
        return len(self.experts) == 1 or self.mixing == "fixed"

    def report(self, names: list[str]) -> dict[str, Any]:
        return {
            "decided_by": self.decided_by,
            "mixing": self.mixing,
            "chosen": {names[e]: w for e, w in zip(self.experts, self.weights, strict=True)},
        }


def request_scores(router_logits: torch.Tensor) -> torch.Tensor:
    """[layers, tokens, experts] router logits of the request's real tokens → [experts] mean probabilities."""
    return router_logits.float().softmax(dim=-1).mean(dim=(0, 1))


def decide(router_logits: torch.Tensor, top_k: int, mixing: str = "router") -> Decision:
    """The request's top-k experts by mean router probability; weights are those probabilities renormalised."""
    started = time.perf_counter()
    values, indices = request_scores(router_logits).topk(top_k)
    weights = (values / values.sum()).tolist()
    return Decision(tuple(indices.tolist()), tuple(weights), "router", mixing, time.perf_counter() - started)


def _moe_blocks(model: PreTrainedModel) -> MoeLayers:
    """Every MoE block (moemerge.tools.moe_layers), with routers that return (logits, weights, indices)."""
    moe = moe_layers(model)
    if any(isinstance(block.gate, torch.nn.Linear) for block in moe.blocks.values()):
        raise MoemergeError(
            f"request routing needs the router modules of transformers 5 (found none in {type(model).__name__}); "
            "upgrade transformers"
        )
    return moe


class _Restriction:
    """The hook's state: which experts, the -inf mask over the others, the weights when every token runs the same
    experts (the decision's with fixed mixing, else 1), times `scale`."""

    def __init__(self, decision: Decision, experts: int, device: torch.device, scale: float = 1.0) -> None:
        self.decision = decision
        self.chosen = torch.tensor(decision.experts, device=device)
        weights = torch.tensor(decision.weights, device=device)
        self.same_weights = (weights if decision.mixing == "fixed" else torch.ones_like(weights)) * scale
        self.mask = torch.full((experts,), float("-inf"), device=device)
        self.mask[self.chosen] = 0.0

    def choose(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens, experts] router logits → (weights, indices), each [tokens, experts run per token]."""
        tokens = logits.shape[0]
        if self.decision.same_for_every_token:
            return self.same_weights.expand(tokens, -1), self.chosen.expand(tokens, -1)
        probs = (logits.float() + self.mask).softmax(dim=-1)
        values, indices = probs.topk(min(top_k, len(self.decision.experts)), dim=-1)
        if renormalize:
            values = values / values.sum(dim=-1, keepdim=True)
        return values, indices

    def hook(self, router: torch.nn.Module, _args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            name = type(router).__name__
            raise MoemergeError(f"{name} does not return (logits, weights, indices); upgrade transformers")
        logits, weights, _ = output
        renormalize = getattr(router, "norm_topk_prob", True)  # Mixtral always renormalises; Qwen when configured
        chosen_weights, indices = self.choose(logits, router.top_k, renormalize)
        return logits, chosen_weights.to(weights.dtype), indices


@contextlib.contextmanager
def restricted(model: PreTrainedModel, decision: Decision | None) -> Iterator[None]:
    """Within the block every router of `model` runs only the decision's experts; None changes nothing.

    Where every token runs the same experts (one expert, or fixed mixing), a shared expert the merge added is
    switched off and the routed experts get back the scale the merge took from them for it, so one expert is
    exactly that expert's MLP, as without a shared expert."""
    if decision is None:
        yield
        return
    moe = _moe_blocks(model)
    blocks = list(moe.blocks.values())
    router = blocks[0].gate
    same = decision.same_for_every_token
    unshared = same and moe.routed_scale is not None
    scale = 1 / moe.routed_scale if unshared else 1.0
    restriction = _Restriction(decision, router.num_experts, router.weight.device, scale)
    handles = [block.gate.register_forward_hook(restriction.hook) for block in blocks]
    stacks = [block.experts for block in blocks if same and _is_stacked_experts(block.experts)]
    for stack in stacks:
        stack.forward = _chosen_experts_forward(stack, list(decision.experts))
    shared = [block.shared_expert for block in blocks if unshared and hasattr(block, "shared_expert")]
    for module in shared:
        module.forward = torch.zeros_like  # its gate's sigmoid times zero: nothing
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in (*stacks, *shared):
            del module.forward


def _is_stacked_experts(module: torch.nn.Module) -> bool:
    """transformers 5's experts module: every expert's MLP stacked in 3-D `gate_up_proj` and `down_proj`."""
    return all(hasattr(module, name) for name in ("gate_up_proj", "down_proj", "act_fn"))


def _chosen_experts_forward(stack: torch.nn.Module, chosen: list[int]):
    """The experts module's forward when every token runs the same experts: each chosen expert's MLP on all
    tokens at once, the same arithmetic per token as the family's loop without its per-expert one-hot, gather
    and scatter, which dominate a decoding step of a small model (measured in benchmarks/request_routing.py)."""

    def forward(hidden: torch.Tensor, _indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for column, expert in enumerate(chosen):
            gate, up = torch.nn.functional.linear(hidden, stack.gate_up_proj[expert]).chunk(2, dim=-1)
            mlp = torch.nn.functional.linear(stack.act_fn(gate) * up, stack.down_proj[expert])
            out += (mlp * weights[:, column, None]).to(out.dtype)
        return out

    return forward


def experts_run(decision: Decision | None, router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[..., k] the experts each (layer, token) ran: the router's top-k, or the decision's choice among its experts.

    Renormalisation does not change which experts run, so it is left out."""
    if decision is None:
        return router_logits.topk(top_k, dim=-1).indices
    restriction = _Restriction(decision, router_logits.shape[-1], router_logits.device)
    flat = router_logits.reshape(-1, router_logits.shape[-1])
    _, indices = restriction.choose(flat, top_k, renormalize=False)
    return indices.reshape(*router_logits.shape[:-1], -1)


@dataclass(frozen=True)
class RoutingPlan:
    """A request's routing settings and the text a request-level decision is made from."""

    settings: RequestRouting
    text: str = ""


def decision_text(messages: list[dict[str, str]]) -> str:
    """What a chat request is routed on: its user messages (a system prompt is often boilerplate shared by every
    request, and earlier answers are the model's own); all messages when there is no user message."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return "\n".join(users or [m["content"] for m in messages])
