"""The `moemerge` command: `moemerge RECIPE OUT` merges; other verbs come as subcommands.

Library errors name settings by their Python names; this module words them for the command line (flags, and
a failed push's resume as a command)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

try:  # typer vendors click since 0.20; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from moemerge.device import resolve_device
from moemerge.errors import MoemergeError, OptionError
from moemerge.formats import FORMATS
from moemerge.hub.push import PushFailed, check_push_target, push
from moemerge.inputs.gate_modes import modes_help
from moemerge.inputs.prompts import read_dataset_csv, read_prompt_file
from moemerge.interrupt import EXIT_CODE, exit_code, handling_signals, interrupted, stopped_line
from moemerge.output.merge import MergeSummary, merge
from moemerge.output.options import MergeOptions
from moemerge.tools.evaluate import DECIDE_TOKENS, evaluate
from moemerge.tools.request_routing import RequestRouting
from moemerge.tools.route_report import route_prompts
from moemerge.tools.routing import DTYPES, EXPERT_COLORS, load_moe, routing_dtype
from moemerge.tools.verify import verify

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=f"Build a mixture-of-experts model ({', '.join(f.title for f in FORMATS.values())}) from a base model and "
    "experts.",
)
err = Console(stderr=True)
DEBUG = {"on": False}

ROUTING_HELP = (
    "token: every token and layer picks its experts (as built); request: one decision per request from the "
    "routers' mean probabilities over its text, then only those experts run."
)
MIXING_HELP = "With --request-top-k above 1: router (its own pick among the chosen) or fixed (the decision's weights)."
DecideTokens = Annotated[
    int, typer.Option(help="With --ppl: request routing decides from this many first tokens, scores the rest.")
]
# The flags of the library's options where a flag is not --option-name (the routing settings' fields).
FLAGS = {
    "routing.mode": "--routing",
    "routing.top_k": "--request-top-k",
    "routing.mixing": "--request-mixing",
    "routing.experts": "--expert",
}


def flag(option: str) -> str:
    """The command line's name for a library option: allow_pickle -> --allow-pickle."""
    return FLAGS.get(option) or "--" + option.replace("_", "-")


def error_line(exc: MoemergeError) -> str:
    """A library error in the command line's words: options as flags, a failed push's resume as a command."""
    if isinstance(exc, OptionError):
        return exc.spelled(flag)
    if isinstance(exc, PushFailed):
        return exc.with_resume(_resume_command(exc))
    return str(exc)


def _resume_command(failed: PushFailed) -> str:
    """The same push again; a pull request's on its branch (a second --create-pr would open a second one)."""
    command = f"moemerge push {shlex.quote(str(failed.out))} {failed.repo_id}" + (
        " --private" if failed.private else ""
    )
    if failed.create_pr:
        return f"{command} --revision refs/pr/N (N: the pull request named above; --create-pr opens a new one)"
    return command + (f" --revision {shlex.quote(failed.revision)}" if failed.revision else "")


class RichBars:
    """Progress bars on stderr; byte-sized tasks show sizes, others counts."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def task(self, description: str, total: int) -> Callable[[int], None]:
        task_id = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task_id, n)


def options_from(**values: object) -> MergeOptions:
    """MergeOptions from command-line values; an out-of-range one is named as its option, in one line."""
    try:
        return MergeOptions(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        raise MoemergeError(f"{flag(str(error['loc'][0]))} {error['input']}: {error['msg'].lower()}") from None


def _print_summary(summary: MergeSummary) -> None:
    size = summary.bytes_written / 1e9
    err.print(
        f"[green]wrote[/green] {summary.out}: {len(summary.experts)} experts ({', '.join(summary.experts)}), "
        f"{summary.layers} layers, {summary.total_params / 1e6:,.1f}M parameters "
        f"({summary.active_params / 1e6:,.1f}M active), {size:.2f} GB in {summary.seconds:.1f} s",
        soft_wrap=True,
        highlight=False,
    )


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    DEBUG["on"] = debug


@app.command("merge", help=f"Merge RECIPE into the folder OUT.\n\nThe recipe's gate_mode: {modes_help()}.")
def merge_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML (mergekit-moe format).")],
    out: Annotated[Path, typer.Argument(help="Output folder; must not exist unless --force.")],
    device: Annotated[str, typer.Option(help="Where hidden states run: auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="Output dtype (overrides the recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random gates and noise.")] = 0,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights (can run code).")] = False,
    allow_vocab_mismatch: Annotated[
        bool, typer.Option(help="Build with the base's vocabulary when experts have added tokens (warns).")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(help="Most prompts per forward pass for hidden gates (4096 padded tokens at most).")
    ] = 256,
    push_to_hub: Annotated[str | None, typer.Option(help="Then upload OUT to this Hub repo (org/name).")] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo private (with --push-to-hub).")] = False,
    revision: Annotated[str | None, typer.Option(help="Push to this branch (with --push-to-hub).")] = None,
    create_pr: Annotated[bool, typer.Option(help="Push as a pull request (with --push-to-hub).")] = False,
) -> None:
    if push_to_hub is not None:  # a bad target or a missing token is refused before the merge, not after it
        check_push_target(push_to_hub, revision, create_pr)
    elif private or revision or create_pr:
        raise MoemergeError("--private, --revision and --create-pr go with --push-to-hub org/name")
    options = options_from(
        device=device,
        dtype=dtype,
        seed=seed,
        shard_size=parse_size(shard_size),
        force=force,
        allow_pickle=allow_pickle,
        allow_vocab_mismatch=allow_vocab_mismatch,
        batch_size=batch_size,
        hub_repo_id=push_to_hub,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bars:
        summary = merge(recipe, out, options, RichBars(bars))
    _print_summary(summary)
    if push_to_hub is not None:
        _push(out, push_to_hub, private, revision, create_pr)


def _push(out: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool) -> None:
    err.print(f"pushing {out} to {repo_id}" + (f" (branch {revision})" if revision else ""), highlight=False)
    url = push(out, repo_id, private=private, revision=revision, create_pr=create_pr)
    err.print(f"[green]pushed[/green] {out} to {url}", soft_wrap=True, highlight=False)


@app.command("push")
def push_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo (org/name); created if missing.")],
    private: Annotated[bool, typer.Option(help="Create the repo private (an existing one keeps its own).")] = False,
    revision: Annotated[str | None, typer.Option(help="Push to this branch (created from main if missing).")] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead of committing to main.")] = False,
) -> None:
    """Upload OUT to the Hugging Face Hub; rerun the same command to resume an interrupted upload."""
    check_push_target(repo_id, revision, create_pr)
    _push(out, repo_id, private, revision, create_pr)


def _layer_strip(experts: list[int]) -> str:
    """One coloured digit per layer: the expert that is the first choice of most tokens in that layer."""
    return "".join(f"[{EXPERT_COLORS[e % len(EXPERT_COLORS)]}]{e % 10}[/]" for e in experts)


@app.command("route")
def route_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompts to route.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="More prompts, one per line (or JSONL).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    request_top_k: Annotated[int, typer.Option(help="Experts in each prompt's request-level decision.")] = 1,
) -> None:
    """Show which experts each prompt is routed to, per layer, each expert's share of tokens, and the
    request-level decision (the routers' mean probabilities over the prompt: what `serve --routing request` runs)."""
    texts = list(prompts or [])
    if file is not None:
        if not file.is_file():
            raise MoemergeError(f"--file {file}: not found")
        texts += read_prompt_file(file, "--file")
    if not texts:
        raise MoemergeError("give prompts to route, or --file prompts.txt")
    model, tokenizer, names = load_moe(out, resolve_device(device))
    report = route_prompts(model, tokenizer, names, texts, request_top_k)
    if json_output:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"routing (top-{report['top_k']}); layer strip: most tokens' first-choice expert")
    table.add_column("prompt", max_width=40, overflow="ellipsis", no_wrap=True)
    table.add_column("layers " + " ".join(map(str, report["prompts"][0]["layers"])))
    for name in names:
        table.add_column(name, justify="right")
    table.add_column(f"request top-{request_top_k}")
    index = {name: i for i, name in enumerate(names)}
    for row in report["prompts"]:
        request = " ".join(f"{name} {weight:.2f}" for name, weight in row["request"]["chosen"].items())
        strip = _layer_strip([index[name] for name in row["layer_top_expert"]])
        shares = (f"{share:.2f}" for share in row["shares"].values())
        table.add_row(row["prompt"].replace("\n", " "), strip, *shares, request)
    colors = EXPERT_COLORS
    legend = "  ".join(f"[{colors[i % len(colors)]}]{i % 10}[/]={name}" for i, name in enumerate(names))
    console = Console()
    console.print(table)
    console.print(
        f"experts: {legend}; shares are of (layer, token) slots and sum to top-k; request: the experts "
        "one decision per prompt picks, with their weights"
    )


def _check_decide_tokens(decide_tokens: int) -> None:
    if decide_tokens < 1:
        raise MoemergeError(f"--decide-tokens {decide_tokens}: must be at least 1")


@app.command("eval")
def eval_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    dataset: Annotated[Path, typer.Argument(help="CSV with columns prompt,expert (index or name).")],
    ppl: Annotated[bool, typer.Option("--ppl", help="Also measure perplexity on each expert's texts.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    request_top_k: Annotated[int, typer.Option(help="Experts in each text's request-level decision.")] = 1,
    decide_tokens: DecideTokens = DECIDE_TOKENS,
    request_mixing: Annotated[str, typer.Option(help=MIXING_HELP)] = "router",
) -> None:
    """Routing accuracy per expert and per layer on a labelled CSV (top-1 router choice = the label), and per
    request (the request-level decision's first expert = the label)."""
    _check_decide_tokens(decide_tokens)
    model, tokenizer, names = load_moe(out, resolve_device(device))
    RequestRouting("request", request_top_k, request_mixing).checked(names)
    if not dataset.is_file():
        raise MoemergeError(f"{dataset}: not found")
    labelled = read_dataset_csv(dataset, names)
    result = evaluate(model, tokenizer, names, labelled, ppl, request_top_k, decide_tokens, request_mixing)
    table = Table(title=f"routing accuracy on {dataset.name} (top-1 router choice equals the label)")
    ppl_columns = ["perplexity", f"ppl after {decide_tokens}: token", "request"] if ppl else []
    for column in ("expert", "prompts", "tokens", "accuracy", "request accuracy", *ppl_columns):
        table.add_column(column, justify="left" if column == "expert" else "right")

    def cell(value: float | None, digits: int) -> str:
        return "—" if value is None or value != value else f"{value:.{digits}f}"

    for i, name in enumerate(names):
        cells = [name, str(result.prompts[i]), str(result.tokens[i]), f"{result.accuracy[i]:.3f}"]
        cells.append(cell(result.request_accuracy[i], 3))
        if ppl:
            perplexities = (result.perplexity, result.scored_token_perplexity, result.request_perplexity)
            cells += [cell(values[i], 2) for values in perplexities]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    strip = " ".join(f"{a:.2f}" for a in result.layer_accuracy)
    console.print(f"per layer ({' '.join(map(str, result.layers))}): {strip}")
    console.print(
        f"request accuracy: share of texts whose request-level decision (top-{request_top_k}, mean router "
        "probability over the text) puts their label first"
        + (f"; request perplexity: decided from the first {decide_tokens} tokens, scored on the rest" if ppl else "")
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")


@app.command("report")
def report_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    prompts: Annotated[list[str] | None, typer.Argument(help="Texts to show.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="More texts, one per line (or JSONL).")] = None,
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="A labelled CSV (prompt,expert) instead of texts.")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    ppl: Annotated[
        bool, typer.Option("--ppl", help="With --dataset: perplexity under token and request routing.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="Routing dtype: auto (bfloat16 on a CPU that computes it natively, else float32), "
            f"{' or '.join(DTYPES)}."
        ),
    ] = "auto",
    request_top_k: Annotated[int, typer.Option(help="Experts in each text's request-level decision.")] = 1,
    decide_tokens: DecideTokens = DECIDE_TOKENS,
    request_mixing: Annotated[str, typer.Option(help=MIXING_HELP)] = "router",
) -> None:
    """Write one self-contained HTML page: tokens coloured by expert, per-layer heatmaps, and for a labelled set
    accuracy per layer and a label × expert matrix; opens from disk, fetches nothing."""
    from moemerge.tools.report import build_report, write_page  # matplotlib only for this command

    if dataset is not None and (prompts or file is not None):
        raise MoemergeError("give texts (arguments or --file) or --dataset, not both")
    if ppl and dataset is None:
        raise MoemergeError("--ppl needs --dataset: perplexity is measured per labelled expert")
    for read, option in ((file, "--file"), (dataset, "--dataset")):
        if read is not None and not read.is_file():
            raise MoemergeError(f"{option} {read}: not found")
        if read is not None and read.resolve() == output.resolve():
            raise MoemergeError(f"--output {output} is the {option} file; write the report elsewhere")
    if not output.parent.is_dir():
        raise MoemergeError(f"--output {output}: folder {output.parent} does not exist")
    texts = list(prompts or []) + (read_prompt_file(file, "--file") if file is not None else [])
    if dataset is None and not texts:
        raise MoemergeError("give texts to show, --file texts.txt or --dataset labelled.csv")
    _check_decide_tokens(decide_tokens)
    where = resolve_device(device)
    model, tokenizer, names = load_moe(out, where, routing_dtype(dtype, where))
    RequestRouting("request", request_top_k, request_mixing).checked(names)
    labelled = read_dataset_csv(dataset, names) if dataset is not None else None
    page = build_report(
        out, model, tokenizer, names, texts, labelled, ppl, request_top_k, decide_tokens, request_mixing
    )
    write_page(page, output)
    err.print(f"[green]wrote[/green] {output} ({len(page.encode()) / 1e6:.1f} MB)", highlight=False)


@app.command("verify")
def verify_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    deep: Annotated[bool, typer.Option(help="Also read every value and load the model with transformers.")] = True,
) -> None:
    """Check an output: index, shard headers, names/shapes/dtypes against config.json, finite values, loading."""
    count = verify(out, deep)
    err.print(f"[green]ok[/green]: {out} holds {count} tensors that match its config" + (" and loads" if deep else ""))


@app.command("serve")
def serve_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    model_name: Annotated[str | None, typer.Option(help="Model id clients use (default: OUT's folder name).")] = None,
    routing: Annotated[str, typer.Option(help=ROUTING_HELP)] = "token",
    request_top_k: Annotated[int, typer.Option(help="Experts per request with --routing request.")] = 1,
    request_mixing: Annotated[str, typer.Option(help=MIXING_HELP)] = "router",
) -> None:
    """Serve OUT over an OpenAI-compatible HTTP API whose replies say which experts answered."""
    from moemerge.tools.serve import serve  # FastAPI and uvicorn only for this command

    settings = RequestRouting(routing, request_top_k, request_mixing)
    serve(out, host, port, resolve_device(device), model_name, settings)


@app.command("chat")
def chat_command(
    out: Annotated[Path, typer.Argument(help="A merged output folder.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    system: Annotated[str | None, typer.Option(help="A system message to start with.")] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0, max=100, help="0 is greedy (default: the model's, else 1).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Longest answer (default: the rest of the context).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    routing: Annotated[str, typer.Option(help=ROUTING_HELP)] = "token",
    request_top_k: Annotated[int | None, typer.Option(help="Experts per request with --routing request.")] = None,
    request_mixing: Annotated[str, typer.Option(help=MIXING_HELP)] = "router",
    expert: Annotated[
        list[str] | None, typer.Option(help="Force this expert for every answer (repeat for more); request routing.")
    ] = None,
) -> None:
    """Chat with OUT in the terminal; after each answer, a bar of the experts' shares."""
    from moemerge.tools.chat import chat

    forced = tuple(expert or ())
    if forced and routing == "token":
        routing = "request"
    top_k = request_top_k if request_top_k is not None else (len(forced) or 1)
    settings = RequestRouting(routing, top_k, request_mixing, forced)
    chat(out, resolve_device(device), system, temperature, max_tokens, seed, routing=settings)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf
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
    with handling_signals():  # first: a Ctrl-C (SIGTERM, SIGHUP) from here on ends in one line and exit 130 (143, 129)
        logging.basicConfig(
            level=logging.WARNING,
            format="%(message)s",
            handlers=[RichHandler(console=err, show_time=False, show_path=False)],
        )
        try:
            code = _run(_with_default_verb(sys.argv[1:]))
        except KeyboardInterrupt:
            code = EXIT_CODE
        if code == EXIT_CODE or interrupted():  # typer turns Ctrl-C into 130; one swallowed elsewhere sets the flag
            err.print(stopped_line(), style="red", highlight=False)
            sys.exit(exit_code())
        if isinstance(code, int) and code:
            sys.exit(code)


def _run(argv: list[str]) -> int | None:
    """Run the command; any error is printed as one line (unless --debug) and becomes the exit status."""
    try:
        return app(args=argv, prog_name="moemerge", standalone_mode=False)
    except MoemergeError as exc:
        if DEBUG["on"]:
            raise
        return _fail(f"[red]error:[/red] {error_line(exc)}", 1)
    except OSError as exc:  # disk full, permissions, a vanished mount: the OS's words, on one line
        if DEBUG["on"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"[red]error:[/red] {where}{exc.strerror or exc}", 1)
    except ClickException as exc:  # usage errors: a missing argument, a bad option value; 2 is for our bugs
        return _fail(f"[red]error:[/red] {exc.format_message()}", 1)
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        if DEBUG["on"]:
            raise
        message = " ".join(f"{exc.__class__.__name__}: {exc}".split())
        return _fail(f"[red]internal error:[/red] {message} (rerun with --debug for details)", 2)


def _fail(line: str, code: int) -> int:
    """Print the error line, unless a Ctrl-C caused the error: then the interruption is the one line."""
    if interrupted():
        return exit_code()
    err.print(line, soft_wrap=True, highlight=False)
    return code
