"""moemerge: build a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE) from a dense base and its fine-tunes."""

from moemerge.errors import MoemergeError
from moemerge.merge import MergeOptions, merge

__all__ = ["MergeOptions", "MoemergeError", "merge"]
__version__ = "0.1.0"
