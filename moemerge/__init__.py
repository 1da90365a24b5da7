"""moemerge: build a Mixtral mixture-of-experts model from a dense base and its fine-tunes."""

from moemerge.errors import MoemergeError
from moemerge.merge import MergeOptions, merge

__all__ = ["MergeOptions", "MoemergeError", "merge"]
__version__ = "0.1.0"
