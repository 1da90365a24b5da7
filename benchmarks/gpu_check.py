"""The CUDA path and the real servers in one prepared check, sized for the few minutes a GPU machine is lent.

Parts, each ending in one summary line (all of them in docs/results/gpu_check.{json,md}):

1. gates: the demo recipe (examples/demo_recipe.yaml) merged with hidden and with trained gates, once with
   `--device cpu` and once with `--device DEVICE`; per layer the lowest cosine between the two outputs'
   router rows (pass: >= 0.999), the routing of held-out benchmark texts (examples/texts, the routing_quality
   split; pass: the same top-k experts on every token and layer) and `moemerge verify --deep` of both.
   Then generated gates, twice on DEVICE from one seed (pass: the same texts and routers both times, and
   verify --deep), with each domain's held-out top-1 routing accuracy as a figure. They are not compared with
   the CPU: the experts' sampled texts follow the device's arithmetic.
2. speed: merge_speed.py on its synthetic bases (random, hidden and trained gates), moemerge against
   mergekit-moe where it is installed: wall, prompts/s, peak RSS and, on cuda, peak GPU memory.
3. servers (gpu_servers.py): Mixtral, Qwen2-MoE, Qwen2-MoE with moe_layers and Qwen3-MoE outputs of the demo;
   transformers' greedy tokens for the demo's questions against vLLM's, and `moemerge serve` answering with
   routing.

Parts run in the order 1, 3, 2 (speed last: it is the one that grows with the budget) and a part that would
start after --budget-s is skipped, with a line saying so; a running step is stopped at the budget. What the
check builds (models, venvs, outputs) is cached under .gpu_check/ (ignored by git), so a second call on the
same machine reuses it.

    python benchmarks/gpu_check.py --device cpu --quick      # CPU on both sides, CI-sized (the test runs it)
    python3 benchmarks/gpu_check.py                          # on the GPU machine: --device cuda, 8 minutes

--quick keeps the code path and shrinks the sizes: a bfloat16 Qwen2-MoE with three sparse layers for part 1,
the `small` synthetic base for part 2, and part 3 skipped (it needs vLLM and minutes). The GPU machine has no
network: benchmarks/gpu_carry.py prepares what it lacks (the SmolLM2 GGUF in two halves, wheels) and says
how to carry it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from bounded import run_bounded  # noqa: E402
from build_base import build_base  # noqa: E402
from domains import DOMAINS, domain_texts  # noqa: E402
from gpu_carry import unpack_carried  # noqa: E402

unpack_carried()  # on the GPU machine: its missing packages, before moemerge imports pydantic

from merge_speed import find_mergekit, write_csv  # noqa: E402
from routing_quality import heldout  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402
from moemerge.files import CONFIG, GENERATED_TEXTS, MANIFEST, read_json_object  # noqa: E402
from moemerge.formats import format_of_config  # noqa: E402
from moemerge.tools.evaluate import evaluate  # noqa: E402
from moemerge.tools.routing import load_moe, route  # noqa: E402
from moemerge.tools.verify import verify  # noqa: E402

CACHE = ROOT / ".gpu_check"
RESULTS = ROOT / "docs" / "results"
DEMO_RECIPE = EXAMPLES / "demo_recipe.yaml"
MIN_COSINE = 0.999
GOAL_SPEEDUP = 5.0  # moemerge's hidden-gate prompts/s over mergekit-moe's (the goal)


@dataclass
class Sizes:
    """How big each part runs: --quick shrinks every number, not the code path."""

    demo_shape: dict[str, object]  # recipe keys that shrink the demo's output
    labelled_per_domain: int  # labelled texts per domain for trained gates (part 1)
    train_steps: int
    heldout_per_domain: int  # benchmark texts routed per domain (part 1)
    synthetic: list[str]  # merge_speed.py sizes (part 2)
    prompts_per_expert: int
    labelled: int  # labelled prompts for trained gates (part 2)


QUICK = Sizes(
    demo_shape={"architecture": "qwen2_moe", "moe_layers": [0, 15, 29], "dtype": "bfloat16"},
    labelled_per_domain=10,
    train_steps=30,
    heldout_per_domain=1,
    synthetic=["small"],
    prompts_per_expert=10,
    labelled=40,
)
FULL = Sizes(
    demo_shape={},
    labelled_per_domain=40,
    train_steps=300,
    heldout_per_domain=12,
    synthetic=["1b", "3b"],
    prompts_per_expert=100,
    labelled=2000,
)


@dataclass
class Part:
    """One part's outcome: pass, fail, measured (figures without a goal), skipped or error."""

    number: int
    name: str
    status: str
    line: str
    details: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


class Budget:
    """The seconds the whole check may take; steps ask what is left before they start."""

    def __init__(self, seconds: float) -> None:
        self.started = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def timeout(self) -> float | None:
        """What is left as a subprocess timeout: None without a budget."""
        return None if self.seconds == float("inf") else self.left()


# ---------------------------------------------------------------------------------------------- part 1


def demo_recipe(path: Path, gate_mode: str, sizes: Sizes, base: Path) -> Path:
    """The demo recipe with absolute paths, `gate_mode`, and for trained gates a labelled CSV of the domains'
    train texts (never the held-out ones the routing is compared on)."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["base_model"] = str(base)
    for expert in recipe["experts"]:
        expert["source_model"] = str(EXAMPLES / expert["source_model"])
    recipe |= {"gate_mode": gate_mode, **sizes.demo_shape}
    if gate_mode == "trained":
        rows = [
            (text, domain)
            for domain in DOMAINS
            for text in domain_texts(domain, "train", sizes.labelled_per_domain, chars=300, seed=1)
        ]
        recipe["dataset_csv"] = str(write_csv(path.with_suffix(".csv"), rows))
        recipe["training"] = {"steps": sizes.train_steps}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, width=1000))
    return path


def router_rows(out: Path) -> dict[int, torch.Tensor]:
    """Every sparse layer's router weight [experts, hidden] as float32, read from the output's shards."""
    config = read_json_object(out / CONFIG)
    output_format = format_of_config(config, str(out / CONFIG))
    wanted = {output_format.gate_name(layer): layer for layer in range(config["num_hidden_layers"])}
    rows: dict[int, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in wanted:
                    rows[wanted[name]] = handle.get_tensor(name).float()
    return rows


def lowest_cosines(first: Path, second: Path) -> dict[int, float]:
    """Per sparse layer, the lowest cosine between the same router row of two outputs."""
    a, b = router_rows(first), router_rows(second)
    if a.keys() != b.keys() or not a:
        raise RuntimeError(f"{first} and {second} have different sparse layers: {sorted(a)} and {sorted(b)}")
    return {layer: float(torch.nn.functional.cosine_similarity(a[layer], b[layer], dim=-1).min()) for layer in a}


def routing_differences(first: Path, second: Path, texts: list[str], device: torch.device) -> tuple[int, int]:
    """(tokens x layers whose set of top-k experts differs, tokens x layers compared) over `texts`; both
    outputs run on the same device, so only their routers differ."""
    choices = []
    for out in (first, second):
        model, tokenizer, _ = load_moe(out, device)
        choices.append([route(model, tokenizer, text).choices.sort(dim=-1).values for text in texts])
        del model
    differing = sum(int((a != b).any(dim=-1).sum()) for a, b in zip(*choices, strict=True))
    return differing, sum(c[..., 0].numel() for c in choices[0])


def merge_timed(recipe: Path, out: Path, device: str) -> float:
    started = time.perf_counter()
    merge(recipe, out, MergeOptions(device=device, force=True))
    return time.perf_counter() - started


def gates_match(args: argparse.Namespace, sizes: Sizes, budget: Budget) -> Part:
    """Part 1: the demo merged on the CPU and on `args.device`, for hidden and trained gates."""
    base = build_base(EXAMPLES / ".cache" / "smollm2-base")
    texts = [text for text, _ in heldout(sizes.heldout_per_domain)]
    sides = ("cpu", args.device)
    details: dict[str, object] = {"sides": sides, "texts": len(texts), "shape": sizes.demo_shape}
    failures, pieces = [], []
    for gate_mode in ("hidden", "trained"):
        recipe = demo_recipe(args.workdir / "recipes" / f"demo-{gate_mode}.yaml", gate_mode, sizes, base)
        outs = [args.workdir / "out" / f"demo-{gate_mode}-{i}-{side}" for i, side in enumerate(sides)]
        seconds = [merge_timed(recipe, out, side) for out, side in zip(outs, sides, strict=True)]
        started = time.perf_counter()
        checked = [verify(out, deep=True) for out in outs]  # raises MoemergeError on the first problem
        verify_s = time.perf_counter() - started
        cosines = lowest_cosines(*outs)
        started = time.perf_counter()
        differing, compared = routing_differences(*outs, texts, torch.device(args.device))
        routing_s = time.perf_counter() - started
        worst = min(cosines.values())
        details[gate_mode] = {
            "merge_s": seconds,
            "verify_s": verify_s,
            "routing_s": routing_s,
            "verified_tensors": checked,
            "lowest_cosine_per_layer": cosines,
            "routing_differences": differing,
            "routing_compared": compared,
        }
        if worst < MIN_COSINE:
            failures.append(f"{gate_mode} router cosine {worst:.6f} < {MIN_COSINE}")
        if differing:
            failures.append(f"{gate_mode} routing differs on {differing} of {compared} token-layers")
        pieces.append(
            f"{gate_mode}: lowest cosine {worst:.6f} over {len(cosines)} layers, routing "
            f"{'identical' if not differing else f'{differing} differing'} on {compared} token-layers, "
            f"verify ok, merges {' / '.join(f'{s:.1f}' for s in seconds)} s"
        )
        if budget.left() == 0:
            break
    if budget.left() > 0:
        piece, failure, details["generated"] = generated_on_device(args, sizes, base)
        pieces.append(piece)
        failures += [failure] if failure else []
    status = "fail" if failures else "pass"
    return Part(1, "gates", status, f"{' vs '.join(sides)}: " + "; ".join(failures or pieces), details)


def generated_on_device(args: argparse.Namespace, sizes: Sizes, base: Path) -> tuple[str, str | None, dict]:
    """generated gates merged twice on args.device from one seed: (summary piece, failure or None, details).
    Each continuation samples from its own seeded generator, so both merges must write the same texts and
    the same routers; the held-out texts' top-1 routing accuracy per domain is reported, not judged."""
    recipe = demo_recipe(args.workdir / "recipes" / "demo-generated.yaml", "generated", sizes, base)
    outs = [args.workdir / "out" / f"demo-generated-{i}-{args.device}" for i in range(2)]
    seconds = [merge_timed(recipe, out, args.device) for out in outs]
    checked = verify(outs[0], deep=True)
    same_texts = (outs[0] / GENERATED_TEXTS).read_bytes() == (outs[1] / GENERATED_TEXTS).read_bytes()
    a, b = router_rows(outs[0]), router_rows(outs[1])
    same_routers = a.keys() == b.keys() and all(torch.equal(a[layer], b[layer]) for layer in a)
    accuracy = domain_accuracy(outs[0], heldout(sizes.heldout_per_domain), torch.device(args.device))
    details = {"merge_s": seconds, "verified_tensors": checked, "same_texts": same_texts}
    details |= {"same_routers": same_routers, "heldout_top1_accuracy": accuracy}
    shown = ", ".join(f"{domain} {share:.2f}" for domain, share in accuracy.items())
    piece = (
        f"generated on {args.device}: the same texts and routers from one seed twice, verify ok, held-out top-1 "
        f"routing {shown}, merges {' / '.join(f'{s:.1f}' for s in seconds)} s"
    )
    failure = None if same_texts and same_routers else "generated: two merges from one seed differ"
    return piece, failure, details


def domain_accuracy(out: Path, labelled: list[tuple[str, int]], device: torch.device) -> dict[str, float]:
    """Per expert, the top-1 routing accuracy of its domain's held-out texts (`moemerge eval`'s; the demo lists
    its experts in DOMAINS order, named after them)."""
    model, tokenizer, _ = load_moe(out, device)
    names = read_json_object(out / MANIFEST)["expert_names"]
    return dict(zip(names, evaluate(model, tokenizer, names, labelled).accuracy, strict=True))


# ---------------------------------------------------------------------------------------------- part 2


def speed_runs(args: argparse.Namespace, size: str, gates: str, methods: str, sizes: Sizes, budget: Budget) -> dict:
    """One merge_speed.py invocation (one repeat), stopped at the budget; its JSON report."""
    report = args.workdir / "speed" / f"{size}-{gates.replace(',', '-')}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(BENCH / "merge_speed.py"),
        *("--size", size, "--gates", gates, "--methods", methods, "--repeats", "1", "--device", args.device),
        *("--prompts-per-expert", str(sizes.prompts_per_expert), "--labelled", str(sizes.labelled)),
        *("--train-steps", str(sizes.train_steps), "--workdir", str(args.workdir / "bench")),
        *("--moemerge", str(args.moemerge), "--json", str(report)),
    ]
    if args.mergekit:
        command += ["--mergekit", str(args.mergekit)]
    run_bounded(command, report.with_suffix(".log"), budget.timeout())
    return json.loads(report.read_text())


def speed(args: argparse.Namespace, sizes: Sizes, budget: Budget) -> Part:
    """Part 2: merge_speed.py's synthetic bases; mergekit-moe beside moemerge for hidden gates where installed
    (not at 3b: its output beside ours and the inputs would outgrow a 64 GB disk)."""
    rows: list[dict[str, object]] = []
    pieces, notes = [], []
    if not args.mergekit:
        notes.append("mergekit-moe not installed (pass --mergekit PATH): moemerge only")
    for size in sizes.synthetic:
        if budget.left() == 0:
            notes.append(f"{size} not run: budget spent")
            continue
        with_mergekit = args.mergekit and size != "3b"
        try:
            for gates, methods in (
                ("random,hidden", "moemerge,mergekit" if with_mergekit else "moemerge"),
                ("trained", "moemerge"),
            ):
                rows += speed_runs(args, size, gates, methods, sizes, budget)["summary"]
        except subprocess.TimeoutExpired:
            notes.append(f"{size} stopped at the budget ({args.budget_s:.0f} s)")
        add_trained_rates(rows, sizes.labelled)
        pieces += [speed_piece(row) for row in rows if row["size"] == size and row["gates"] != "random"]
    speedups = hidden_speedups(rows)
    status = "measured"
    if speedups:
        status = "pass" if min(speedups.values()) >= GOAL_SPEEDUP else "fail"
        pieces += [f"{size} hidden prompts/s {ratio:.1f}x mergekit-moe's" for size, ratio in speedups.items()]
    details = {"rows": rows, "hidden_speedup_over_mergekit": speedups, "notes": notes}
    return Part(2, "speed", status, "; ".join(pieces + notes), details)


def add_trained_rates(rows: list[dict[str, object]], labelled: int) -> None:
    """merge_speed.py gives prompts/s for hidden gates (the prompts over what they cost above random gates);
    trained gates get the same figure here, from their own invocation's rows."""
    random = {(r["size"], r["method"]): r["median_wall_sync_s"] for r in rows if r["gates"] == "random"}
    for row in rows:
        extra = row["median_wall_sync_s"] - random.get((row["size"], row["method"]), float("inf"))
        if row["gates"] == "trained" and extra > 0:
            row["prompts_per_s"] = labelled / extra


def hidden_speedups(rows: list[dict[str, object]]) -> dict[str, float]:
    """Per size, moemerge's hidden-gate prompts/s over mergekit-moe's, where both were measured."""
    hidden = {(r["size"], r["method"]): r["prompts_per_s"] for r in rows if r["gates"] == "hidden"}
    return {
        size: hidden[(size, "moemerge")] / hidden[(size, "mergekit")]
        for size, method in hidden
        if method == "mergekit" and hidden[(size, "mergekit")] and hidden.get((size, "moemerge"))
    }


def speed_piece(row: dict[str, object]) -> str:
    gpu = f", GPU {row['peak_gpu_gib']:.2f} GiB" if row.get("peak_gpu_gib") is not None else ""
    rate = f"{row['prompts_per_s']:.1f} prompts/s, " if row.get("prompts_per_s") else ""
    return (
        f"{row['size']} {row['gates']} {row['method']}: {rate}{row['median_wall_s']:.1f} s, "
        f"RSS {row['peak_tree_rss_gib']:.2f} GiB{gpu}"
    )


# ---------------------------------------------------------------------------------------------- part 3


def servers_part(args: argparse.Namespace, sizes: Sizes, budget: Budget) -> Part:
    """Part 3 (gpu_servers.py); skipped by --quick with the one line saying why."""
    from gpu_servers import find_vllm, servers

    if args.quick:
        vllm, how = find_vllm(args, args.workdir)
        found = f"vLLM found ({how})" if vllm else f"vLLM skipped: {how}"
        return Part(3, "servers", "skipped", f"--quick leaves out part 3 (minutes of merges and servers); {found}")
    base = build_base(EXAMPLES / ".cache" / "smollm2-base")
    recipe = yaml.safe_load(
        demo_recipe(args.workdir / "recipes" / "demo-servers.yaml", "hidden", sizes, base).read_text()
    )
    status, line, details = servers(args, recipe, base, budget)
    return Part(3, "servers", status, line, details)


# ---------------------------------------------------------------------------------------------- running


def run_part(number: int, name: str, step, budget: Budget) -> Part:
    """One part, timed; skipped when the budget is spent, an error (one line, traceback in details) when it
    raises, so the parts after it still run."""
    started = time.perf_counter()
    if budget.left() == 0:
        part = Part(number, name, "skipped", f"budget spent ({budget.seconds:.0f} s) before this part")
    else:
        try:
            part = step()
        except Exception as exc:  # one part's failure is that part's result, reported with the others
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            details = {"traceback": traceback.format_exc()}
            part = Part(number, name, "error", f"{type(exc).__name__}: {first}", details)
    part.seconds = time.perf_counter() - started
    print(summary_line(part), flush=True)
    return part


def summary_line(part: Part) -> str:
    return f"{part.number} {part.name}: {part.status.upper()} ({part.seconds:.0f} s) {part.line}"


def machine(device: str) -> dict[str, object]:
    """What ran the check: CPU, GPU, Python and torch."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    load = os.getloadavg()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg": load,
    }


def markdown(parts: list[Part], header: dict[str, object]) -> str:
    """The table docs/benchmarks.md quotes: one row per part, headed by the command, date and machine."""
    where = header["machine"]
    lines = [
        f"`{header['command']}` — {header['date']}, {where['gpu'] or 'no GPU'}, {where['cpu']}, "
        f"{where['cores']} cores, torch {where['torch']}, load {where['loadavg']:.1f}; "
        f"{header['seconds']:.0f} s in all",
        "",
        "| part | result | seconds | summary |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p.number} {p.name} | {p.status} | {p.seconds:.0f} | {p.line} |" for p in parts]
    return "\n".join(lines) + "\n"


def moemerge_command(workdir: Path) -> Path:
    """The `moemerge` console script beside this python, else a launcher written to WORKDIR/bin (the GPU
    machine runs the source tree, not an installed package)."""
    beside = Path(sys.executable).parent / "moemerge"
    if beside.is_file():
        return beside
    launcher = workdir / "bin" / "moemerge"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(f"#!{sys.executable}\nimport sys\n\nfrom moemerge.cli import main\n\nsys.exit(main())\n")
    launcher.chmod(0o755)
    return launcher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="the side compared with cpu")
    parser.add_argument("--quick", action="store_true", help="CI sizes; part 3 skipped")
    parser.add_argument("--budget-s", type=float, help="parts and steps stop here (default: 480 on cuda)")
    parser.add_argument("--sizes", help="merge_speed.py sizes for part 2 (default: 1b,3b; small with --quick)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run")
    parser.add_argument("--mergekit", help="mergekit-moe 0.1.5 (default: PATH, else /work/mkvenv)")
    parser.add_argument("--vllm-python", help="an interpreter that imports vllm")
    parser.add_argument("--vllm-wheels", type=Path, help="a folder of wheels to build a vLLM venv from, offline")
    parser.add_argument("--workdir", type=Path, default=CACHE)
    parser.add_argument("--json", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "gpu_check.md")
    args = parser.parse_args(argv)
    args.parts = {int(n) for n in args.parts.split(",") if n}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.sizes:
        sizes = replace(sizes, synthetic=args.sizes.split(","))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here; run with --device cpu (--quick for CI sizes)")
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.moemerge = moemerge_command(args.workdir)
    found = find_mergekit(args.mergekit)
    args.mergekit = found if found is not None and found.is_file() else None
    if args.budget_s is None:
        args.budget_s = 480.0 if args.device == "cuda" else float("inf")
    budget = Budget(args.budget_s)
    steps = {
        1: ("gates", lambda: gates_match(args, sizes, budget)),
        3: ("servers", lambda: servers_part(args, sizes, budget)),
        2: ("speed", lambda: speed(args, sizes, budget)),
    }
    parts = [run_part(n, name, step, budget) for n, (name, step) in steps.items() if n in args.parts]
    parts.sort(key=lambda part: part.number)
    header = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(args.device),
        "seconds": budget.elapsed(),
        "budget_s": None if budget.timeout() is None else args.budget_s,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**header, "parts": [asdict(p) for p in parts]}, indent=2, default=str) + "\n")
    args.markdown.write_text(markdown(parts, header))
    print(f"all parts in {budget.elapsed():.0f} s; {args.json} and {args.markdown} written")
    return 1 if any(p.status in ("fail", "error") for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
