"""Prompts from the recipe, from prompt files, and from a labelled dataset CSV (mistral.rs AnyMoE's form)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from moemerge.errors import MoemergeError
from moemerge.recipe import PROMPT_MODES, Recipe
from moemerge.sources import find_path


@dataclass
class ExpertPrompts:
    """Every expert's positive and negative prompts, and the labelled dataset if the recipe has one."""

    positive: list[list[str]]
    negative: list[list[str]]
    labelled: list[tuple[str, int]]


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
                prompts.append(str(row["prompt"] if "prompt" in row else row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                message = f"{path}: line {number}: expected a JSON object with a prompt or text field"
                raise MoemergeError(message) from None
        return prompts
    return [line for line in lines if line.strip()]


def read_dataset_csv(path: Path, names: list[str]) -> list[tuple[str, int]]:
    """`prompt,expert` rows; expert is a 0-based index or a name. Quoted prompts may span lines."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"prompt", "expert"} - set(reader.fieldnames or [])
            if missing:
                raise MoemergeError(f"{path}: missing column {sorted(missing)[0]}; the header must be prompt,expert")
            rows = list(reader)
    except UnicodeDecodeError:
        raise MoemergeError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise MoemergeError(f"{path}: malformed CSV ({exc})") from None
    labelled = []
    for number, row in enumerate(rows, start=2):
        prompt, expert = (row.get("prompt") or ""), (row.get("expert") or "").strip()
        if not prompt.strip():
            raise MoemergeError(f"{path}: row {number}: empty prompt")
        if expert in names:
            labelled.append((prompt, names.index(expert)))
        elif expert.isdigit() and int(expert) < len(names):
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
    positive, negative = [], []
    for i, expert in enumerate(recipe.experts):
        pos = [p for p in expert.positive_prompts if p.strip()]
        neg = [p for p in expert.negative_prompts if p.strip()]
        if expert.positive_prompts_file:
            key = f"experts[{i}].positive_prompts_file"
            pos += read_prompt_file(_locate(expert.positive_prompts_file, recipe_dir, key), key)
        if expert.negative_prompts_file:
            key = f"experts[{i}].negative_prompts_file"
            neg += read_prompt_file(_locate(expert.negative_prompts_file, recipe_dir, key), key)
        positive.append(pos)
        negative.append(neg)
    labelled: list[tuple[str, int]] = []
    if recipe.dataset_csv:
        labelled = read_dataset_csv(_locate(recipe.dataset_csv, recipe_dir, "dataset_csv"), recipe.expert_names())
        for prompt, expert in labelled:
            positive[expert].append(prompt)
    if recipe.gate_mode in PROMPT_MODES:
        for i, prompts in enumerate(positive):
            if not prompts:
                raise MoemergeError(
                    f"experts[{i}]: no prompts (inline, file or dataset), but gate_mode {recipe.gate_mode} needs them"
                )
    return ExpertPrompts(positive, negative, labelled)
