"""Router rows as the README defines them, computed here in float64 from transformers' own forward pass (hooks
on the dense base), so tests can check moemerge's gates against a computation that shares none of its code."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

SHRINKAGE = 0.5  # the README: the within-expert covariance is shrunk halfway to a multiple of the identity


def router_inputs(model, tokenizer, prompt: str) -> torch.Tensor:
    """[layers, real tokens, hidden] float64: each layer's post-attention RMSNorm output (what its router sees),
    for one prompt run alone (no padding), without the BOS token the tokenizer adds."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _i, out, i=i: seen.__setitem__(i, out[0].double())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    keep = slice(1, None) if ids[0, 0].item() == tokenizer.bos_token_id else slice(None)
    return torch.stack([seen[i][keep] for i in range(len(seen))])


def tokens_of(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Every prompt's real tokens' router inputs, concatenated: [layers, tokens, hidden]."""
    return torch.cat([router_inputs(model, tokenizer, p) for p in prompts], dim=1)


def unit_rows(rows: torch.Tensor, norm: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """Centred over experts, unit length, times gate_scale / norm (per layer): [layers, experts, hidden]."""
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True) * (gate_scale / norm)[:, None, None]


def hidden_rows(base: Path, positive: list[list[str]], negative: list[list[str]], gate_scale: float) -> torch.Tensor:
    """`hidden` gates: Σ_shrunk⁻¹ (targetₑ − mean of targets), targetₑ = mean router input of the expert's
    positive prompts' tokens minus that of its negative prompts' tokens; Σ the within-expert covariance of the
    positive prompts' token router inputs; rows scaled by gate_scale over the layer's mean router-input norm."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    pos = [tokens_of(model, tokenizer, prompts) for prompts in positive]
    neg = [tokens_of(model, tokenizer, prompts) if prompts else None for prompts in negative]
    targets = torch.stack(
        [p.mean(dim=1) - (n.mean(dim=1) if n is not None else 0) for p, n in zip(pos, neg, strict=True)], dim=1
    )
    residual = torch.cat([p - p.mean(dim=1, keepdim=True) for p in pos], dim=1)  # [layers, tokens, hidden]
    hidden = residual.shape[-1]
    rows = []
    for layer in range(residual.shape[0]):
        scatter = residual[layer].T @ residual[layer] / residual.shape[1]
        shrunk = (1 - SHRINKAGE) * scatter + SHRINKAGE * scatter.trace() / hidden * torch.eye(hidden).double()
        centred = targets[layer] - targets[layer].mean(dim=0)
        rows.append(torch.linalg.solve(shrunk, centred.T).T)
    everything = torch.cat([*pos, *[n for n in neg if n is not None]], dim=1)
    return unit_rows(torch.stack(rows), everything.norm(dim=-1).mean(dim=1), gate_scale)


def gate_rows(out: Path) -> torch.Tensor:
    """The router weights a merged Mixtral holds, [layers, experts, hidden], read with safetensors itself."""
    rows = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith("block_sparse_moe.gate.weight"):
                    rows[int(name.split(".")[2])] = handle.get_tensor(name)
    return torch.stack([rows[i] for i in range(len(rows))])


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    """Every row within `rel` of the largest expected entry (float32 against float64)."""
    error = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= rel * scale, f"max abs error {error:.3e}, {error / scale:.2e} of the largest entry {scale:.3e}"
