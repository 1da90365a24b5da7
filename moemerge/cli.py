"""The `moemerge` command: `moemerge RECIPE OUT` merges; other verbs come as subcommands."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from moemerge.errors import MoemergeError
from moemerge.merge import MergeOptions, MergeSummary, merge

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build a Mixtral MoE from a base model and experts.")
err = Console(stderr=True)
DEBUG = {"on": False}


class RichBars:
    """Progress bars on stderr; byte-sized tasks show sizes, others counts."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def task(self, description: str, total: int) -> Callable[[int], None]:
        task_id = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task_id, n)


def _print_summary(summary: MergeSummary) -> None:
    size = summary.bytes_written / 1e9
    err.print(
        f"[green]wrote[/green] {summary.out}: {len(summary.experts)} experts ({', '.join(summary.experts)}), "
        f"{summary.layers} layers, {summary.total_params / 1e6:,.1f}M parameters "
        f"({summary.active_params / 1e6:,.1f}M active), {size:.2f} GB in {summary.seconds:.1f} s"
    )


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    DEBUG["on"] = debug


@app.command("merge")
def merge_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML (mergekit-moe format).")],
    out: Annotated[Path, typer.Argument(help="Output folder; must not exist unless --force.")],
    device: Annotated[str, typer.Option(help="Where hidden states run: auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="Output dtype (overrides the recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random gates and noise.")] = 0,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights (can run code).")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass for hidden gates.")] = 16,
) -> None:
    """Merge RECIPE into the folder OUT."""
    options = MergeOptions(device, dtype, seed, parse_size(shard_size), force, allow_pickle, batch_size)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bars:
        summary = merge(recipe, out, options, RichBars(bars))
    _print_summary(summary)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise MoemergeError(f"--shard-size {text!r}: use a size such as 5GB or 500MB") from None
    if value <= 0:
        raise MoemergeError(f"--shard-size {text!r}: must be positive")
    return value


def _with_default_verb(argv: list[str]) -> list[str]:
    """`moemerge RECIPE OUT` means `moemerge merge RECIPE OUT`, as in mergekit-moe."""
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    for i, arg in enumerate(argv):
        if arg == "--debug":
            continue
        if arg.startswith("-") or arg in commands:
            return argv
        return argv[:i] + ["merge"] + argv[i:]
    return argv


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=False)],
    )
    argv = _with_default_verb(sys.argv[1:])
    try:
        app(args=argv, prog_name="moemerge", standalone_mode=False)
    except MoemergeError as exc:
        if DEBUG["on"]:
            raise
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing was written to the output folder")
        sys.exit(130)
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        if DEBUG["on"]:
            raise
        err.print(f"[red]internal error:[/red] {exc.__class__.__name__}: {exc} (rerun with --debug for details)")
        sys.exit(2)
