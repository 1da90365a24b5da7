"""The `routing` object of a reply: which experts read the prompt and wrote the completion, counted as the
engine decodes (the counting rule itself is routing.expert_counts, shared with `moemerge route`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from moemerge.tools.request_routing import Decision, experts_run
from moemerge.tools.routing import expert_counts


class ReplyRouting:
    """Per expert: how many (layer, token) pairs had it in their top-k, for the prompt and for generated tokens;
    `layers` counts the routing layers only (moemerge.tools.moe_layers)."""

    def __init__(
        self, layers: int, experts: int, top_k: int, device: torch.device, decision: Decision | None = None
    ) -> None:
        self.layers, self.top_k, self.decision = layers, top_k, decision
        self.ran_per_token = top_k  # experts each (layer, token) ran: top_k, or fewer under a request decision
        self.prompt = torch.zeros(experts, dtype=torch.long, device=device)
        self.completion = torch.zeros(experts, dtype=torch.long, device=device)
        self.prompt_tokens = self.completion_tokens = 0
        self.seconds = decision.seconds if decision else 0.0

    def add(self, router_logits: torch.Tensor, prompt: bool) -> None:
        """router_logits: [routing layers, tokens, experts] of one forward pass."""
        start = time.perf_counter()
        choices = experts_run(self.decision, router_logits.float(), self.top_k)  # [layers, tokens, k]
        experts = self.prompt.numel()
        self.ran_per_token = choices.shape[-1]
        if prompt:
            self.prompt += expert_counts(choices, experts)
            self.prompt_tokens = choices.shape[1]
        # the last position's routing is that of the pass that produces the next token
        self.completion += expert_counts(choices[:, -1:], experts)
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
