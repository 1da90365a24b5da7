"""Run a dense base one decoder layer at a time, reading each layer's weights from its files when it is needed.

The router inputs of layer i need only layers 0..i, so the prompts' hidden states can be pushed through the
base layer by layer: one layer's weights are resident at a time, whatever the base's size, and each layer is
read once for all prompts (accelerate's disk offload reads every layer again for every batch).

The masks, positions and rotary embeddings come from the family's own transformers model: a `shell` of it
is built on the meta device (no memory), its decoder layers replaced by pass-throughs except the one being
run, its final norm by an identity, and it is called with the hidden states as `inputs_embeds`. So causal
and padding masks, Mistral's sliding window, Qwen's per-layer attention types and Llama 3 rope scaling are
exactly what the whole model does, in whichever transformers version is installed.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moemerge.errors import MoemergeError
from moemerge.inputs.families import EMBEDDINGS
from moemerge.inputs.sources import ModelSource


class _PassThrough(torch.nn.Module):
    """Stands in for every decoder layer but the one being run."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD = 4 * 2**20


@functools.cache  # once per process: the setting is process-wide
def _return_large_blocks_on_free() -> None:
    """Make glibc serve blocks of 4 MiB and more (layer weights, activations) from mmap, so that freeing them
    returns them to the system. By default the threshold rises with every larger block freed, up to 32 MiB;
    freed layers then stay resident in the heaps of the gate thread and the writer, and the peak RSS varied
    from run to run with thread timing (0.84-1.56 GiB on the 2b base; 0.67-0.73 GiB fixed at 4 MiB, at the
    same speed; a fixed 128 KiB was as flat and 30% slower). Process-wide, and a no-op without glibc. libc is
    found among the symbols the process has loaded, not by ctypes.util.find_library: that runs ldconfig, and a
    child forked from the merge counts the merge's memory twice until it runs (benchmarks/merge_speed.py's
    process-tree peak caught one)."""
    if sys.platform.startswith("linux"):
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


class LayerStack:
    """The dense base as an embedding lookup plus decoder layers loaded one at a time onto `device`."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoModel

        from moemerge.hf import quiet

        quiet()
        _return_large_blocks_on_free()
        self.source, self.device, self.dtype = source, device, dtype
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        with torch.device("meta"):
            shell = AutoModel.from_config(config, trust_remote_code=False)
        self.num_layers = len(shell.layers)
        self._meta_layers = list(shell.layers)
        shell.layers = torch.nn.ModuleList([_PassThrough() for _ in range(self.num_layers)])
        shell.norm = torch.nn.Identity()
        with torch.device(device):
            shell.rotary_emb = type(shell.rotary_emb)(config=config)
        self._shell = shell.eval()
        self._rows = source.tensors.byte_range(EMBEDDINGS, source.tensors.dtype(EMBEDDINGS))
        self.hidden_size = source.tensors.shape(EMBEDDINGS)[1]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] → their embedding rows [B, T, H], reading only those rows of the embedding."""
        wanted, where = torch.unique(input_ids, return_inverse=True)
        # pickled weights (opted in) have no byte range: those read the whole matrix
        rows = self.source.tensors.load(EMBEDDINGS)[wanted] if self._rows is None else self._read_rows(wanted.tolist())
        return rows.to(self.device, self.dtype)[where.to(self.device)]

    def _read_rows(self, ids: list[int]) -> torch.Tensor:
        """Rows `ids` (sorted, distinct) of the embedding, straight from the file; consecutive ids in one read."""
        info = self._rows
        width = info.nbytes // info.shape[0]
        out = torch.empty(len(ids), width, dtype=torch.uint8)
        with info.file.open("rb") as handle:
            start = 0
            while start < len(ids):
                end = start + 1
                while end < len(ids) and ids[end] == ids[end - 1] + 1:
                    end += 1
                handle.seek(info.start + ids[start] * width)
                if handle.readinto(out[start:end].numpy()) != (end - start) * width:
                    raise MoemergeError(f"{info.file}: tensor {EMBEDDINGS} is truncated")
                start = end
        return out.view(info.dtype).reshape(len(ids), *info.shape[1:])

    @contextmanager
    def loaded(self, layer: int) -> Iterator[torch.nn.Module]:
        """Decoder layer `layer` with its weights read from the files, placed in the shell while in use and
        dropped (with its memory) on exit."""
        module = copy.deepcopy(self._meta_layers[layer])
        prefix = _layer_prefix(layer)
        state = {
            name: self.source.tensors.load(prefix + name).to(self.device, self.dtype) for name in module.state_dict()
        }
        module.load_state_dict(state, strict=True, assign=True)
        del state
        self._shell.layers[layer] = module.eval()
        try:
            yield module
        finally:
            self._shell.layers[layer] = _PassThrough()
            del module

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The loaded layer applied to hidden states [B, T, H] under a 2-D padding mask [B, T]."""
        with torch.inference_mode():
            out = self._shell(inputs_embeds=hidden, attention_mask=attention_mask.to(hidden.device), use_cache=False)
        return out.last_hidden_state
