"""Prompts from the recipe, from prompt files, and from a labelled dataset CSV (mistral.rs AnyMoE's form)."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.inputs.gate_modes import GATE_MODE_SPECS, Needs
from moemerge.inputs.recipe import Recipe
from moemerge.inputs.sources import find_path

log = logging.getLogger("moemerge")


@dataclass
class ExpertPrompts:
    """Every expert's positive and negative prompts, and the labelled dataset if the recipe has one."""

    positive: list[list[str]]
    negative: list[list[str]]
    labelled: list[tuple[str, int]]
    files: list[Path]  # every file the prompts came from: a merge must never write over one


def _locate(text: str, recipe_dir: Path, key: str) -> Path:
    found = find_path(text, recipe_dir)
    if found is None or not found.is_file():
        raise MoemergeError(f"{key}: file {text!r} not found (looked in the working directory and next to the recipe)")
    return found


def read_prompt_file(path: Path, key: str) -> list[str]:
    """One prompt per line, or JSONL whose objects hold a `prompt` or `text` field; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MoemergeError(f"{key}: {path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                row = None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                message = f"{path}: line {number}: expected a JSON object with a prompt or text field holding text"
                raise MoemergeError(message)
            prompts.append(text)
        return prompts
    return [line for line in lines if line.strip()]


def read_dataset_csv(path: Path, names: list[str]) -> list[tuple[str, int]]:
    """`prompt,expert` rows; expert is a 0-based index or a name. Quoted prompts may span lines."""
    limit = csv.field_size_limit()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a byte order mark is not a column
            # The csv module refuses fields over 131,072 characters; no field is longer than the file, so that
            # bound (for this read only: the limit is process-wide) lets long prompts through.
            csv.field_size_limit(max(limit, os.fstat(handle.fileno()).st_size + 1))
            reader = csv.DictReader(handle)
            missing = {"prompt", "expert"} - set(reader.fieldnames or [])
            if missing:
                raise MoemergeError(f"{path}: missing column {sorted(missing)[0]}; the header must be prompt,expert")
            rows = list(reader)
    except UnicodeDecodeError:
        raise MoemergeError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise MoemergeError(f"{path}: malformed CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)
    labelled = []
    for number, row in enumerate(rows, start=2):
        prompt, expert = (row.get("prompt") or ""), (row.get("expert") or "").strip()
        if not prompt.strip():
            raise MoemergeError(f"{path}: row {number}: empty prompt")
        if expert in names:
            labelled.append((prompt, names.index(expert)))
        elif re.fullmatch(r"[0-9]+", expert) and int(expert) < len(names):  # ASCII only: '²' is no index
            labelled.append((prompt, int(expert)))
        else:
            raise MoemergeError(
                f"{path}: row {number}: unknown expert {expert!r}; use an index 0..{len(names) - 1} or one of "
                f"{', '.join(names)}"
            )
    if not labelled:
        raise MoemergeError(f"{path}: no rows")
    return labelled


def gather_prompts(recipe: Recipe, recipe_dir: Path) -> ExpertPrompts:
    """Inline prompts, then prompt files, then dataset rows (which count as their expert's positive prompts)."""
    positive, negative, files = [], [], []
    for i, expert in enumerate(recipe.experts):
        pos = [p for p in expert.positive_prompts if p.strip()]
        neg = [p for p in expert.negative_prompts if p.strip()]
        if expert.positive_prompts_file:
            key = f"experts[{i}].positive_prompts_file"
            files.append(_locate(expert.positive_prompts_file, recipe_dir, key))
            pos += read_prompt_file(files[-1], key)
        if expert.negative_prompts_file:
            key = f"experts[{i}].negative_prompts_file"
            files.append(_locate(expert.negative_prompts_file, recipe_dir, key))
            neg += read_prompt_file(files[-1], key)
        positive.append(pos)
        negative.append(neg)
    labelled: list[tuple[str, int]] = []
    if recipe.dataset_csv:
        files.append(_locate(recipe.dataset_csv, recipe_dir, "dataset_csv"))
        labelled = read_dataset_csv(files[-1], recipe.expert_names())
        for prompt, expert in labelled:
            positive[expert].append(prompt)
    mode = GATE_MODE_SPECS[recipe.gate_mode]
    if mode.needs_prompts:
        for i, prompts in enumerate(positive):
            if prompts:
                continue
            if not negative[i]:
                raise MoemergeError(
                    f"experts[{i}]: no prompts (inline, file or dataset), but gate_mode {recipe.gate_mode} needs them"
                )
            log.warning(
                f"experts[{i}]: its positive prompts are empty; its router row is built from its negative prompts "
                "alone (it is chosen for what is unlike them)"
            )
    if mode.needs is Needs.DATASET:
        _check_training_rows(recipe, labelled, Path(recipe.dataset_csv or ""))
    return ExpertPrompts(positive, negative, labelled, files)


def split_prompts(labels: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: each expert keeps `holdout` of its prompts aside (none if it has fewer than 2)."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for expert in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == expert]
        order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        count = int(round(len(members) * holdout)) if len(members) > 1 else 0
        held += order[:count]
        train += order[count:]
    return sorted(train), sorted(held)


def _check_training_rows(recipe: Recipe, labelled: list[tuple[str, int]], dataset: Path) -> None:
    """Every expert with dataset rows keeps some for training after the holdout (else fitting has nothing to
    fit, found only after the router inputs are captured); an expert with none is trained only to lose."""
    labels = [label for _, label in labelled]
    train, _ = split_prompts(labels, recipe.training.holdout, recipe.training.seed)
    kept = {labels[i] for i in train}
    names = recipe.expert_names()
    for expert in sorted(set(labels) - kept):
        raise MoemergeError(
            f"training.holdout {recipe.training.holdout}: holds out every {dataset.name} row of {names[expert]} "
            f"(experts[{expert}]), leaving none to train on; lower holdout or add rows"
        )
    for expert in sorted(set(range(len(names))) - set(labels)):
        log.warning(
            f"experts[{expert}] ({names[expert]}) has no rows in {dataset.name}: trained layers learn never to "
            "route to it"
        )
