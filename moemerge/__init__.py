"""moemerge: build a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE) from a dense base and its fine-tunes."""

from moemerge.interrupt import guard_startup

guard_startup()  # before the heavy imports below, and only when this process is the `moemerge` command

from moemerge.errors import MoemergeError  # noqa: E402
from moemerge.output.merge import MergeOptions, merge  # noqa: E402

__all__ = ["MergeOptions", "MoemergeError", "merge"]
__version__ = "0.1.0"
