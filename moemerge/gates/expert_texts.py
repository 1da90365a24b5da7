"""The experts write their own labelled set (gate_mode `generated`): each expert, run as a dense model of its
own, continues each of its positive prompts, and every continuation is labelled with the expert that wrote it.

A recipe rarely ships labelled data, but every expert can write text of its own domain when given a start:
its continuations are in-domain text in the expert's own voice, many times longer than the prompts, so
`trained` gates fitted on them see the router inputs of real domain text instead of five short prompts
(benchmarks/routing_quality.py: the `generated` row).

One dense model is loaded (the base, in the capture dtype) and each expert's MLP weights are copied into it in
turn, base + adapter delta or the fine-tune's own (moemerge.inputs.experts.Expert.own_weight): never more than
one expert at a time. Sampling is done here rather than by transformers' `generate`, so that every
continuation draws from a generator of its own, seeded from (seed, expert, prompt, sample): the texts do not
depend on how rows are batched, only on the seed (and on the device's arithmetic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moemerge.errors import MoemergeError
from moemerge.hf import load_model
from moemerge.inputs.experts import Expert
from moemerge.inputs.families import MLP_PROJECTIONS, mlp_tensor
from moemerge.inputs.recipe import GenerateSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("moemerge")
BATCH_TOKENS = 8192  # padded prompt + new tokens per decode batch, which bounds the KV cache
MAX_ROWS = 64  # continuations decoded together
CANDIDATES = 1024  # most likely tokens a nucleus is first looked for in (sample_next)
# What an unprompted continuation starts from: a line break, the most neutral start a text can have (a model
# needs one token to condition on). What an expert writes from it is what it writes most readily: its
# domain, beyond the topics of its few prompts (benchmarks/generated_defaults.py).
UNPROMPTED = "\n"


@dataclass(frozen=True)
class Continuation:
    """What one expert wrote after one of its prompts; `seed` seeds this continuation's sampler alone."""

    expert: int
    prompt_index: int
    sample: int
    prompt: str
    text: str
    new_tokens: int
    seed: int

    def record(self, names: Sequence[str], spec: GenerateSpec) -> dict:
        """One JSONL line: who wrote what, from which prompt, with which sampler settings."""
        return {
            "expert": names[self.expert],
            "label": self.expert,
            "prompt": self.prompt,
            "continuation": self.text,
            "new_tokens": self.new_tokens,
            "seed": self.seed,
            "settings": spec.model_dump(mode="json"),
        }


def row_seed(seed: int, expert: int, prompt: int, sample: int) -> int:
    """One seed per continuation, so a row's text does not depend on the rows it is batched with."""
    return (seed * 1_000_003 + expert * 100_003 + prompt * 1_009 + sample) % (2**63)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Nucleus sampling, one generator per row: logits [rows, vocab] → token ids [rows]. Top-p keeps the most
    likely tokens whose probabilities sum to at least `top_p` (always the most likely one), and one uniform
    draw per row picks among them by their cumulative probabilities. The nucleus is looked for among the
    CANDIDATES most likely tokens first: sorting the whole vocabulary of every row at every step cost more
    than the decoding itself on CPU; only rows whose nucleus is wider fall back to the full sort."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    ordered, order = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((ordered.sum(dim=-1) < top_p).any()):
        ordered, order = probs.sort(dim=-1, descending=True)
    ordered = ordered.masked_fill(ordered.cumsum(dim=-1) - ordered >= top_p, 0.0)
    cumulative = ordered.cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators]) * cumulative[:, -1]
    picks = torch.searchsorted(cumulative, draws[:, None], right=True)
    picks = torch.minimum(picks, (ordered > 0).sum(dim=-1, keepdim=True) - 1)  # a draw rounded up to the total
    return order.gather(1, picks).squeeze(1)


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a continuation: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def continue_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    seeds: Sequence[Sequence[int]],
    spec: GenerateSpec,
    advance: Callable[[int], None],
) -> list[list[list[int]]]:
    """Sample continuations of each prompt, one per seed in `seeds[i]` (prompts may have different counts): the
    prompts are left-padded and run through the model once, and each one's KV cache is repeated for its
    continuations. Returns each continuation's new token ids, cut before its first stop token. `advance` hears
    of every token written (rows × steps) at every step, and of the steps left once every row has stopped."""
    device = model.device
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    counts = [len(row) for row in seeds]
    owner = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(counts, device=device))
    cache, logits = out.cache, out.logits[owner, -1]
    cache.batch_select_indices(owner)
    mask, positions = mask[owner], positions[owner, -1:]
    generators = [torch.Generator(device=device).manual_seed(s) for row in seeds for s in row]
    stops = torch.tensor(_stop_ids(model, tokenizer), device=device)
    rows = len(generators)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    written: list[torch.Tensor] = []
    for step in range(spec.max_new_tokens):
        token = torch.where(done, stops[0], sample_next(logits, spec.temperature, spec.top_p, generators))
        done |= torch.isin(token, stops)
        written.append(torch.where(done, -1, token))
        advance(rows)
        if bool(done.all()) or step == spec.max_new_tokens - 1:
            advance(rows * (spec.max_new_tokens - step - 1))
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    tokens = torch.stack(written, dim=1).cpu().tolist()
    cut = iter([row[: row.index(-1)] if -1 in row else row for row in tokens])
    return [[next(cut) for _ in range(count)] for count in counts]


def use_expert(model: PreTrainedModel, expert: Expert, num_layers: int) -> None:
    """Copy the expert's own MLP weights (no noise or residual scale: the expert as it was fine-tuned) into
    the dense model, one tensor at a time; every MLP weight is replaced, so nothing of the last expert stays."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in range(num_layers):
            for projection in MLP_PROJECTIONS:
                name = mlp_tensor(layer, projection)
                params[name].copy_(expert.own_weight(name))


@dataclass(frozen=True)
class _Start:
    """What an expert continues: a prompt (or UNPROMPTED), its number for seeds and records, how many samples,
    and the prompt its records show."""

    text: str
    index: int
    samples: int
    shown: str


def _batches(lengths: Sequence[int], samples: Sequence[int], spec: GenerateSpec) -> list[list[tuple[int, range]]]:
    """(start, sample numbers) pairs decoded together: at most MAX_ROWS rows (a start with more samples than
    that is cut into runs of MAX_ROWS) and about BATCH_TOKENS padded tokens. An expert's prompts and its
    unprompted start share a batch when they fit: each batch costs a decoding pass of its own."""
    runs = [(p, range(k, min(k + MAX_ROWS, n))) for p, n in enumerate(samples) for k in range(0, n, MAX_ROWS)]
    batches: list[list[tuple[int, range]]] = []
    group: list[tuple[int, range]] = []
    for p, run in runs:
        longest = max(lengths[q] for q, _ in [*group, (p, run)])
        rows = sum(len(r) for _, r in group) + len(run)
        if group and (rows > MAX_ROWS or rows * (longest + spec.max_new_tokens) > BATCH_TOKENS):
            batches.append(group)
            group = []
        group.append((p, run))
    if group:
        batches.append(group)
    return batches


def _write_starts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    expert: Expert,
    starts: Sequence[_Start],
    spec: GenerateSpec,
    advance: Callable[[int], None],
) -> list[Continuation]:
    """Each start's samples, written by the expert in the model."""
    lengths = [len(ids) for ids in tokenizer([start.text for start in starts])["input_ids"]]
    written = []
    for batch in _batches(lengths, [start.samples for start in starts], spec):
        chosen = [(starts[p], run) for p, run in batch]
        seeds = [[row_seed(spec.seed, expert.index, start.index, k) for k in run] for start, run in chosen]
        new = continue_batch(model, tokenizer, [start.text for start, _ in chosen], seeds, spec, advance)
        for (start, run), row_seeds, continuations in zip(chosen, seeds, new, strict=True):
            for k, seed, ids in zip(run, row_seeds, continuations, strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                written.append(Continuation(expert.index, start.index, k, start.shown, text, len(ids), seed))
    return written


def write_expert_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    experts: Sequence[Expert],
    prompts: Sequence[Sequence[str]],
    spec: GenerateSpec,
    progress_task: Callable[[str, int], Callable[[int], None]],
) -> list[Continuation]:
    """Every expert's `spec.continuations` continuations of each of its prompts, then its `spec.unprompted`
    continuations of no prompt (UNPROMPTED), in (expert, prompt, sample) order, sampled from `spec.seed`
    (which must be set). `model` is the dense base, whose MLP weights are overwritten expert by expert."""
    num_layers = model.config.num_hidden_layers
    per_expert = [len(group) * spec.continuations + spec.unprompted * bool(group) for group in prompts]
    advance = progress_task(f"experts writing on {model.device.type} (tokens)", sum(per_expert) * spec.max_new_tokens)
    written: list[Continuation] = []
    for expert, group in zip(experts, prompts, strict=True):
        if not group:
            continue
        use_expert(model, expert, num_layers)
        starts = [_Start(prompt, p, spec.continuations, prompt) for p, prompt in enumerate(group)]
        if spec.unprompted:  # recorded with an empty prompt: the text is the expert's own from its first token
            starts.append(_Start(UNPROMPTED, len(group), spec.unprompted, ""))
        written += _write_starts(model, tokenizer, expert, starts, spec, advance)
    written.sort(key=lambda row: (row.expert, row.prompt_index, row.sample))
    return written


def labelled_texts(
    written: Sequence[Continuation], names: Sequence[str], with_prompt: bool
) -> tuple[list[str], list[int]]:
    """Training texts and labels: each continuation (after its prompt when `with_prompt`), labelled with the
    expert that wrote it. Blank continuations are left out; an expert that wrote nothing but blanks or
    special tokens is refused, since its router would be fitted on no text of its own."""
    texts, labels = [], []
    for row in written:
        if row.text.strip():
            texts.append(row.prompt + row.text if with_prompt else row.text)
            labels.append(row.expert)
    for expert, name in enumerate(names):
        mine = [row for row in written if row.expert == expert]
        if not mine:
            raise MoemergeError(
                f"experts[{expert}] ({name}): has no positive prompts to continue, so it wrote nothing to fit its "
                "router on; give it positive_prompts or use gate_mode: hidden"
            )
        blank = sum(not row.text.strip() for row in mine)
        if blank == len(mine):
            raise MoemergeError(
                f"experts[{expert}] ({name}): all {blank} continuations it wrote are empty or special tokens only "
                "(it ends its text at once), so there is nothing to fit its router on; give it longer prompts "
                "that it continues, or use gate_mode: hidden"
            )
        if blank:
            log.warning(f"experts[{expert}] ({name}): {blank} of {len(mine)} continuations were empty; left out")
    return texts, labels


def load_writer(path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The dense base that the experts take turns in, on `device` in `dtype`."""
    return load_model(path, dtype).to(device)
