"""Greedy tokens from vLLM for gpu_check.py, run by an interpreter that imports vllm (its own venv).

    python vllm_greedy.py MODEL PROMPTS_JSON ANSWER_JSON NEW_TOKENS

PROMPTS_JSON holds a list of token-id lists (the caller applied the chat template, so both sides see the
same ids); ANSWER_JSON gets, per prompt, the generated ids and each step's top-5 log-probabilities.
float32, like the transformers side, so a difference is the engines' and not the dtype's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vllm import LLM, SamplingParams


def main() -> None:
    model, prompts_file, answer_file, new_tokens = sys.argv[1:]
    prompts = json.loads(Path(prompts_file).read_text())
    llm = LLM(model=model, dtype="float32", seed=0, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=int(new_tokens), logprobs=5)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    answers = [
        {
            "tokens": list(result.outputs[0].token_ids),
            "logprobs": [{str(t): p.logprob for t, p in step.items()} for step in result.outputs[0].logprobs],
        }
        for result in results
    ]
    Path(answer_file).write_text(json.dumps(answers))


if __name__ == "__main__":
    main()
