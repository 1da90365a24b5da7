"""Merge speed and memory: moemerge against mergekit-moe and a plain copy, on generated Llama models.

make_models.py (run in a child process, so this one stays small) writes a random dense Llama base and
experts (the base with other MLP weights) as sharded bf16 safetensors, straight from tensors, with a
config.json and a word-level tokenizer whose vocabulary matches the embeddings. Models are cached under
--workdir and reused by later runs.

Then, for each gate mode, it runs on the same mergekit-moe recipe, alternating, --repeats times:

- `moemerge RECIPE OUT --force`
- `mergekit-moe RECIPE OUT --device cpu --no-lazy-unpickle` (its own defaults otherwise)
- `cp -r` of moemerge's output to a new folder followed by `sync`: the disk-speed yardstick

Each output folder is removed (and the removal synced) before its run. Measured per run:

- wall: from starting the process until it has exited (interpreter start and imports included);
- +sync: wall plus a `sync` run right after it, so that output a tool left in the page cache is counted
  (moemerge fsyncs its shards itself, mergekit-moe does not; the copy includes its sync already);
- peak tree RSS: the largest sum of VmRSS over the process and all its descendants, polled from /proc
  every --poll-ms milliseconds (RssAnon is summed the same way: memory not backed by a file);
- max single RSS: ru_maxrss of the child from wait4(), the kernel's own peak of the largest single
  process in the tree (exact, not polled; its floor is this script's own RSS at fork, about 30 MB);
- output bytes: the sum of file sizes in the output folder;
- inputs cached: the fraction of the input safetensors resident in the page cache just before the run
  (from `fincore`), since a merge that reads from the cache is not reading from the disk;
- revision: the moemerge commit measured ("+dirty" when moemerge/ had uncommitted changes), and the
  1-minute load average after the run (the machine may be shared: quote medians and pair ratios).

The table's prompts/s (hidden gates) is the number of prompts over the extra median wall+sync that hidden
gates cost over random gates, for the same method and size; it is as noisy as the difference of two medians.

`--device cuda` (or cpu) is passed to moemerge and to mergekit-moe (which otherwise gets `--device cpu`); with
cuda each merge runs under cuda_peak.py, which records its torch.cuda.max_memory_allocated (peak GPU GiB).

`--baseline DIR` adds the method `baseline`: the same moemerge command run with PYTHONPATH=DIR, another
source tree of moemerge (e.g. main's, to compare the streamed hidden-state pass with the whole-model one).
`--gates trained --labelled N` writes a labelled CSV of N prompts (`--labelled-words MIN,MAX` words each)
and trains on it (`--train-steps`, `--train-layers`). `--size smollm2` measures the real fixture instead:
SmolLM2-135M (`--smollm2-base`, built by examples/build_base.py) with the three example LoRA adapters,
prompts and ~300-character labelled texts from examples/domains.py.

Usage (from the repository root, with the project's venv):

    python benchmarks/merge_speed.py --size small --repeats 1
    python benchmarks/merge_speed.py --size 1b --gates random,hidden --repeats 3 --json /tmp/bench-1b.json
    python benchmarks/merge_speed.py --size 2b --gates random --methods moemerge
    python benchmarks/merge_speed.py --size 3b --gates random,hidden --methods moemerge   # 51 GB of disk
    python benchmarks/merge_speed.py --combine /tmp/bench-1b-random.json /tmp/bench-1b-hidden.json
    python benchmarks/merge_speed.py --size 1b --gates random,hidden --methods moemerge,baseline --baseline /work/main
    python benchmarks/merge_speed.py --size smollm2 --gates trained --labelled 360 --methods moemerge
    python benchmarks/merge_speed.py --combine benchmarks/results/merge_speed-hidden-flat.json \
        --figure docs/figures/merge_speed-by-size.png    # a figure from earlier JSON: nothing is run
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import yaml

GIB = 2**30
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
METHODS = ("moemerge", "baseline", "mergekit", "copy")
MERGEKIT_VENV = Path("/work/mkvenv/bin/mergekit-moe")
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2"  # the real fixture: SmolLM2-135M and the three example LoRA adapters


@dataclass(frozen=True)
class ModelSize:
    """The shape of a generated dense Llama model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight of LlamaForCausalLM (untied), in the order save_pretrained writes layers."""
        kv = self.kv_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            prefix = f"model.layers.{i}."
            shapes += [
                (prefix + "input_layernorm.weight", (self.hidden,)),
                (prefix + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (prefix + "self_attn.k_proj.weight", (kv, self.hidden)),
                (prefix + "self_attn.v_proj.weight", (kv, self.hidden)),
                (prefix + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (prefix + "post_attention_layernorm.weight", (self.hidden,)),
                (prefix + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (prefix + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (prefix + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        return shapes + [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]

    def params(self) -> int:
        return sum(numel(shape) for _, shape in self.tensor_shapes())

    def mlp_params(self) -> int:
        return sum(numel(shape) for name, shape in self.tensor_shapes() if ".mlp." in name)

    def moe_params(self, experts: int) -> int:
        """Parameters of the merged Mixtral: the dense model with `experts` MLPs and a router per layer."""
        return self.params() + (experts - 1) * self.mlp_params() + self.layers * experts * self.hidden

    def config(self) -> dict[str, object]:
        """config.json of the dense model, as a Hugging Face Llama folder has it."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


SIZES = {
    "small": ModelSize("small", hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4),
    "1b": ModelSize("1b", hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=16),
    "2b": ModelSize("2b", hidden=2048, intermediate=5632, layers=32, heads=32, kv_heads=16),
    "3b": ModelSize("3b", hidden=2048, intermediate=5632, layers=64, heads=32, kv_heads=16),
}


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# ---------------------------------------------------------------------------------------------- generation


def vocabulary(size: int) -> list[str]:
    """Special tokens, then distinct lowercase words (2, 3, then 4 letters) up to `size` tokens."""
    words = list(SPECIAL_TOKENS)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(2):
        for chars in itertools.product(letters, repeat=length):
            if len(words) == size:
                return words
            words.append("".join(chars))
    raise AssertionError("unreachable")


def model_folders(workdir: Path, size: ModelSize, experts: int) -> tuple[Path, list[Path]]:
    """Where the base and the experts of `size` live under `workdir`."""
    root = workdir / "models" / size.name
    return root / "base", [root / f"expert{i}" for i in range(experts)]


def ensure_models(workdir: Path, size: ModelSize, experts: int) -> tuple[Path, list[Path]]:
    """The base and expert folders for `size`, generated once and reused.

    Generation runs in its own process (make_models.py), so this one never imports torch: a child's
    ru_maxrss starts from its parent's RSS at fork, and a small parent keeps that floor low.
    """
    script = Path(__file__).with_name("make_models.py")
    command = [sys.executable, str(script), size.name, str(workdir), str(experts)]
    subprocess.run(command, check=True)
    return model_folders(workdir, size, experts)


def expert_prompts(words: list[str], expert: int, experts: int, count: int) -> list[str]:
    """`count` short prompts (6 to 12 words) for one expert, mostly from its own slice of the vocabulary."""
    rng = random.Random(f"prompts-{expert}")
    pool = words[len(SPECIAL_TOKENS) :]
    own = pool[expert::experts]
    return [
        " ".join(rng.choice(own if rng.random() < 0.8 else pool) for _ in range(rng.randint(6, 12)))
        for _ in range(count)
    ]


def labelled_prompts(words: list[str], experts: int, count: int, lengths: tuple[int, int]) -> list[tuple[str, int]]:
    """`count` labelled prompts (expert e's words 80% of the time), `lengths` words each, experts in turn."""
    rng = random.Random("labelled")
    pool = words[len(SPECIAL_TOKENS) :]
    rows = []
    for i in range(count):
        expert = i % experts
        own = pool[expert::experts]
        length = rng.randint(*lengths)
        rows.append((" ".join(rng.choice(own if rng.random() < 0.8 else pool) for _ in range(length)), expert))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int | str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "expert"])
        writer.writerows(rows)
    return path


@dataclass
class Inputs:
    """What a merge reads: base and expert folders, each expert's prompts, and the labelled set."""

    base: Path
    experts: list[Path]
    prompts: list[list[str]]
    labelled: list[tuple[str, int | str]]


def synthetic_inputs(args: argparse.Namespace, size: ModelSize) -> Inputs:
    words = vocabulary(size.vocab)
    base, experts = ensure_models(args.workdir, size, args.experts)
    prompts = [expert_prompts(words, i, len(experts), args.prompts) for i in range(len(experts))]
    labelled = labelled_prompts(words, len(experts), args.labelled, args.labelled_words) if args.labelled else []
    return Inputs(base, experts, prompts, labelled)


def smollm2_inputs(args: argparse.Namespace) -> Inputs:
    """SmolLM2-135M (built by examples/build_base.py) with the three example adapters; prompts and labelled
    ~300-character texts of each domain from examples/domains.py."""
    sys.path.insert(0, str(ROOT / "examples"))
    from domains import DOMAINS, domain_texts, short_prompts

    per_domain = -(-args.labelled // len(DOMAINS))
    labelled = [(t, d) for d in DOMAINS for t in domain_texts(d, "train", per_domain, chars=300, seed=1)]
    prompts = [short_prompts(d, args.prompts) for d in DOMAINS]
    return Inputs(args.smollm2_base, [ROOT / "examples" / "adapters" / d for d in DOMAINS], prompts, labelled)


def write_recipe(path: Path, inputs: Inputs, gates: str, args: argparse.Namespace) -> Path:
    """A mergekit-moe recipe: bf16, two experts per token, prompts per expert (unused by random gates); for
    trained gates the labelled set as a CSV and the training settings."""
    recipe: dict[str, object] = {
        "base_model": str(inputs.base),
        "gate_mode": gates,
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(folder), "name": f"e{i}", "positive_prompts": prompts}
            for i, (folder, prompts) in enumerate(zip(inputs.experts, inputs.prompts, strict=True))
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if gates == "trained":
        named = [(text, f"e{label}" if isinstance(label, int) else label) for text, label in inputs.labelled]
        if isinstance(inputs.labelled[0][1], str):
            for entry, name in zip(recipe["experts"], dict.fromkeys(label for _, label in named), strict=True):
                entry["name"] = name
        recipe["dataset_csv"] = str(write_csv(path.with_suffix(".csv"), named))
        recipe["training"] = {"steps": args.train_steps, "layers": args.train_layers}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, width=1000))
    return path


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """One finished process: wall time, memory peaks and exit status."""

    wall_s: float
    peak_tree_rss: int
    peak_tree_anon: int
    max_single_rss: int
    returncode: int
    samples: int


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children (empty once the process is gone)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def process_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes; zeros for a process that has exited or is a zombie."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, anon


def measure(command: list[str], log: Path, poll_s: float, env_extra: dict[str, str] | None = None) -> Measurement:
    """Run `command` (output to `log`), polling the memory of its process tree until wait4 reaps it."""
    peak_rss = peak_anon = samples = 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    with log.open("w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            usages = [process_memory(p) for p in process_tree(process.pid)]
            peak_rss = max(peak_rss, sum(u[0] for u in usages))
            peak_anon = max(peak_anon, sum(u[1] for u in usages))
            samples += 1
            time.sleep(poll_s)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(wall, peak_rss, peak_anon, usage.ru_maxrss * 1024, process.returncode, samples)


def source_revision(repo: Path) -> str:
    """The moemerge commit being measured, with "+dirty" when moemerge/ has uncommitted changes."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "moemerge"], capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def search_path(tree: Path) -> str:
    """PYTHONPATH for a merge: `tree` first, then what this process was given (a GPU machine's carried
    packages, say), so the merge imports that tree's moemerge and still finds its dependencies."""
    return os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)


def timed_sync() -> float:
    """Seconds that `sync` takes: the writeback a finished command left behind (and anything else dirty)."""
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def cached_fraction(folders: list[Path]) -> float | None:
    """Fraction of the folders' safetensors bytes resident in the page cache, from util-linux fincore."""
    files = [str(f) for folder in folders for f in sorted(folder.glob("*.safetensors"))]
    if not files or shutil.which("fincore") is None:
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    pairs = [line.split() for line in result.stdout.splitlines() if line.strip()]
    total = sum(int(size) for _, size in pairs)
    return sum(int(res) for res, _ in pairs) / total if total else None


def remove(folder: Path) -> None:
    """Drop an output folder and sync, so its writeback does not land in the next timed run."""
    if folder.exists():
        shutil.rmtree(folder)
    subprocess.run(["sync"], check=True)


# ---------------------------------------------------------------------------------------------- the runs


@dataclass
class RunRecord:
    """One timed run of one method."""

    method: str
    gates: str
    size: str
    repeat: int
    command: list[str]
    wall_s: float
    sync_s: float
    peak_tree_rss: int
    peak_tree_anon: int
    max_single_rss: int
    output_bytes: int
    inputs_cached: float | None
    returncode: int
    samples: int
    revision: str
    prompts: int
    loadavg: float = field(default_factory=lambda: os.getloadavg()[0])
    peak_gpu: int | None = None  # torch.cuda.max_memory_allocated of the merge (--device cuda only)

    @property
    def total_s(self) -> float:
        return self.wall_s + self.sync_s


def find_moemerge(given: str | None) -> Path:
    """--moemerge, else the script next to this interpreter (the venv's), else PATH."""
    if given:
        return Path(given)
    beside = Path(sys.executable).parent / "moemerge"
    found = beside if beside.is_file() else shutil.which("moemerge")
    if not found:
        sys.exit("moemerge not found: pass --moemerge PATH")
    return Path(found)


def find_mergekit(given: str | None) -> Path | None:
    """--mergekit, else mergekit-moe on PATH, else the known venv; None when it is nowhere."""
    if given:
        return Path(given)
    found = shutil.which("mergekit-moe")
    if found:
        return Path(found)
    return MERGEKIT_VENV if MERGEKIT_VENV.is_file() else None


def merge_command(method: str, tool: Path, recipe: Path, out: Path, device: str | None = None) -> list[str]:
    """The merge's command line; `device` None leaves moemerge its default (auto) and gives mergekit-moe cpu."""
    if method in ("moemerge", "baseline"):
        return [str(tool), str(recipe), str(out), "--force", *(["--device", device] if device else [])]
    return [str(tool), str(recipe), str(out), "--device", device or "cpu", "--no-lazy-unpickle"]


def with_cuda_peak(command: list[str], peak_file: Path) -> list[str]:
    """`command` (a console script) run by cuda_peak.py under its own venv's python, which writes the merge's
    peak GPU memory to `peak_file` as it exits."""
    tool = Path(command[0])
    python = tool.parent / "python"
    runner = Path(__file__).with_name("cuda_peak.py")
    return [str(python if python.is_file() else sys.executable), str(runner), str(peak_file), *command]


def read_peak(peak_file: Path) -> int | None:
    """The bytes cuda_peak.py wrote, None when the run wrote none (it was not run under cuda_peak.py)."""
    if not peak_file.is_file():
        return None
    text = peak_file.read_text().strip()
    peak_file.unlink()
    return int(text)


def copy_command(source: Path, target: Path) -> list[str]:
    return ["sh", "-c", 'cp -r "$0" "$1" && sync', str(source), str(target)]


def run_one(
    method: str, command: list[str], out: Path, inputs: list[Path], log: Path, poll_s: float, env: dict[str, str]
) -> tuple[Measurement, float, float | None]:
    """Remove `out`, record input cache residency, run and measure, then time a trailing sync."""
    remove(out)
    cached = cached_fraction(inputs)
    result = measure(command, log, poll_s, env)
    sync_s = timed_sync() if method != "copy" else 0.0
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"{method} failed with exit code {result.returncode}; log {log}:\n{tail}")
    return result, sync_s, cached


def benchmark_gates(args: argparse.Namespace, gates: str, tools: dict[str, Path]) -> list[RunRecord]:
    """All repeats of every method for one gate mode; the merge order alternates between repeats."""
    workdir: Path = args.workdir
    given = smollm2_inputs(args) if args.size == SMOLLM2 else synthetic_inputs(args, SIZES[args.size])
    base, experts = given.base, given.experts
    recipe = write_recipe(workdir / "recipes" / f"{args.size}-{gates}.yaml", given, gates, args)
    (workdir / "logs").mkdir(exist_ok=True)
    merges = [m for m in ("moemerge", "baseline", "mergekit") if m in args.methods]
    prompts = len(given.labelled) if gates == "trained" else sum(len(p) for p in given.prompts)
    peak_file = workdir / "logs" / "cuda-peak"
    records: list[RunRecord] = []
    for repeat in range(args.repeats):
        order = merges if repeat % 2 == 0 else merges[::-1]
        if "copy" in args.methods:
            order = order + ["copy"]
        for method in order:
            out = workdir / "out" / method
            if method == "copy":
                command, inputs = copy_command(workdir / "out" / "moemerge", out), [workdir / "out" / "moemerge"]
            else:
                command, inputs = merge_command(method, tools[method], recipe, out, args.device), [base, *experts]
                if args.device == "cuda":
                    command = with_cuda_peak(command, peak_file)
            log = workdir / "logs" / f"{args.size}-{gates}-{method}-{repeat}.log"
            revision = source_revision(args.baseline if method == "baseline" else ROOT)
            env = {"PYTHONPATH": search_path(args.baseline if method == "baseline" else ROOT)}
            result, sync_s, cached = run_one(method, command, out, inputs, log, args.poll_ms / 1000, env)
            record = RunRecord(
                method,
                gates,
                args.size,
                repeat,
                command,
                result.wall_s,
                sync_s,
                result.peak_tree_rss,
                result.peak_tree_anon,
                result.max_single_rss,
                folder_bytes(out),
                cached,
                result.returncode,
                result.samples,
                revision,
                prompts,
                peak_gpu=read_peak(peak_file),
            )
            records.append(record)
            print(
                f"{args.size} {gates} {method} #{repeat}: {record.wall_s:.1f} s (+sync {sync_s:.1f}), "
                f"tree RSS {record.peak_tree_rss / GIB:.2f} GiB, single {record.max_single_rss / GIB:.2f} GiB, "
                f"{record.output_bytes / 1e9:.2f} GB, inputs cached {_percent(cached)}, load {record.loadavg:.1f}, "
                f"moemerge {revision}",
                file=sys.stderr,
                flush=True,
            )
    return records


# ---------------------------------------------------------------------------------------------- reporting


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def summarize(records: list[RunRecord]) -> list[dict[str, object]]:
    """One row per (size, gates, method): medians, ranges, peaks, the ratio to the copy and prompts/s.

    ratio_to_copy compares median wall+sync with the median copy (cp -r + sync) of the same size and gates.
    prompts_per_s, for hidden gates: the prompts divided by the extra median wall+sync over random gates of
    the same method and size (the cost of computing hidden states), when both were run (--combine joins
    the runs of several invocations); ratio_to_random is the median wall+sync over that of random gates.
    """
    keys = sorted({(r.size, r.gates, r.method) for r in records}, key=lambda k: (k[0], k[1], METHODS.index(k[2])))
    rows: list[dict[str, object]] = []
    for size, gates, method in keys:
        runs = [r for r in records if (r.size, r.gates, r.method) == (size, gates, method)]
        copies = [r.total_s for r in records if (r.size, r.gates, r.method) == (size, gates, "copy")]
        walls = [r.wall_s for r in runs]
        totals = [r.total_s for r in runs]
        row: dict[str, object] = {
            "method": method,
            "gates": gates,
            "size": size,
            "runs": len(runs),
            "median_wall_s": statistics.median(walls),
            "min_wall_s": min(walls),
            "max_wall_s": max(walls),
            "median_wall_sync_s": statistics.median(totals),
            "peak_tree_rss_gib": max(r.peak_tree_rss for r in runs) / GIB,
            "peak_tree_anon_gib": max(r.peak_tree_anon for r in runs) / GIB,
            "max_single_rss_gib": max(r.max_single_rss for r in runs) / GIB,
            "output_gb": statistics.median(r.output_bytes for r in runs) / 1e9,
            "ratio_to_copy": statistics.median(totals) / statistics.median(copies) if copies else None,
            "ratio_to_random": None,
            "prompts_per_s": None,
            "median_loadavg": statistics.median(r.loadavg for r in runs),
            "peak_gpu_gib": max(gpu) / GIB if (gpu := [r.peak_gpu for r in runs if r.peak_gpu is not None]) else None,
        }
        random_runs = [r.total_s for r in records if (r.size, r.gates, r.method) == (size, "random", method)]
        if gates != "random" and random_runs and method != "copy":
            extra = statistics.median(totals) - statistics.median(random_runs)
            row["ratio_to_random"] = statistics.median(totals) / statistics.median(random_runs)
            row["prompts_per_s"] = runs[0].prompts / extra if extra > 0 and gates == "hidden" else None
        rows.append(row)
    return rows


def pair_ratios(records: list[RunRecord]) -> list[dict[str, object]]:
    """moemerge / each other merge (today's code as `baseline`, mergekit-moe) wall+sync, repeat by repeat,
    and the median of those ratios."""
    ratios = []
    for size, gates in sorted({(r.size, r.gates) for r in records}):
        by_repeat: dict[int, dict[str, float]] = {}
        for r in records:
            if (r.size, r.gates) == (size, gates):
                by_repeat.setdefault(r.repeat, {})[r.method] = r.total_s
        for other in ("baseline", "mergekit"):
            pairs = [v["moemerge"] / v[other] for v in by_repeat.values() if {"moemerge", other} <= v.keys()]
            if pairs:
                ratios.append(
                    {"size": size, "gates": gates, "other": other, "ratios": pairs, "median": statistics.median(pairs)}
                )
    return ratios


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, object]], baseline: str = "whole-model pass") -> str:
    """The summary rows as a markdown table; `baseline` says what the baseline tree is."""
    header = (
        "| method | gates | size | runs | median wall s | min–max s | median wall+sync s | peak tree RSS GiB "
        "| peak tree anon GiB | max single RSS GiB | output GB | ratio to copy | ratio to random | prompts/s "
        "| load avg |"
    )
    lines = [header, "|" + "---|" * 15]
    for row in rows:
        method = {"copy": "copy (cp -r + sync)", "baseline": f"moemerge, {baseline} (baseline)"}.get(
            row["method"], row["method"]
        )
        cells = [
            method,
            row["gates"],
            row["size"],
            row["runs"],
            _fmt(row["median_wall_s"], 1),
            f"{row['min_wall_s']:.1f}–{row['max_wall_s']:.1f}",
            _fmt(row["median_wall_sync_s"], 1),
            _fmt(row["peak_tree_rss_gib"]),
            _fmt(row["peak_tree_anon_gib"]),
            _fmt(row["max_single_rss_gib"]),
            _fmt(row["output_gb"]),
            _fmt(row["ratio_to_copy"]),
            _fmt(row.get("ratio_to_random")),
            _fmt(row["prompts_per_s"], 1),
            _fmt(row.get("median_loadavg"), 1),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=[*sorted(SIZES), SMOLLM2], default="1b")
    parser.add_argument("--gates", default="random,hidden", help="comma-separated gate modes")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: moemerge,mergekit,copy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--prompts-per-expert", dest="prompts", type=int, default=100)
    parser.add_argument("--labelled", type=int, default=0, help="labelled prompts in all (trained gates)")
    parser.add_argument("--labelled-words", default="6,12", help="MIN,MAX words per labelled prompt (synthetic)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-layers", help="comma-separated layers to train (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="passed to both merges (default: their own)")
    parser.add_argument("--baseline", type=Path, help="a moemerge source tree to run as method `baseline`")
    parser.add_argument("--smollm2-base", type=Path, default=ROOT / "examples" / ".cache" / "smollm2-base")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-bench"))
    parser.add_argument("--moemerge", help="the moemerge command (default: beside this python, else PATH)")
    parser.add_argument("--mergekit", help="the mergekit-moe command (default: PATH, else /work/mkvenv)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="RSS polling interval")
    parser.add_argument("--json", type=Path, help="write runs and summary here")
    parser.add_argument("--markdown", type=Path, help="write the summary table here")
    parser.add_argument("--keep-outputs", action="store_true", help="leave the last outputs under WORKDIR/out")
    parser.add_argument("--combine", type=Path, nargs="+", help="only report: join the runs of earlier --json files")
    parser.add_argument("--figure", type=Path, help="write the summary as a PNG here (with --combine: nothing is run)")
    args = parser.parse_args(argv)
    args.gates = [g for g in args.gates.split(",") if g]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method {sorted(unknown)[0]}; choose from {', '.join(METHODS)}")
    if "copy" in args.methods and "moemerge" not in args.methods:
        parser.error("copy copies moemerge's output: include moemerge")
    if "baseline" in args.methods and args.baseline is None:
        args.methods.remove("baseline")
    if "trained" in args.gates and not args.labelled:
        parser.error("trained gates need --labelled N")
    args.labelled_words = tuple(int(n) for n in args.labelled_words.split(","))
    args.train_layers = [int(n) for n in args.train_layers.split(",")] if args.train_layers else None
    return args


def load_runs(path: Path) -> list[RunRecord]:
    """The runs of an earlier --json report."""
    report = json.loads(path.read_text())
    return [RunRecord(**run) for run in report["runs"]]


def combined_runs(paths: list[Path]) -> list[RunRecord]:
    """The runs of several reports, repeats renumbered after those of the files before, so that pair
    ratios pair runs of the same invocation only."""
    records: list[RunRecord] = []
    for path in paths:
        shift = max((r.repeat for r in records), default=-1) + 1
        for run in load_runs(path):
            run.repeat += shift
            records.append(run)
    return records


def report_markdown(rows: list[dict[str, object]], ratios: list[dict[str, object]], revisions: list[str]) -> str:
    """The summary table (its baseline named by the revisions it ran at) followed by the pair ratios."""
    table = markdown(rows, f"at {', '.join(revisions)}") if revisions else markdown(rows)
    lines = [
        f"moemerge / {ratio.get('other', 'mergekit')} wall+sync, {ratio['size']} {ratio['gates']}: "
        f"{ratio['median']:.2f} ({', '.join(f'{r:.2f}' for r in ratio['ratios'])})"
        for ratio in ratios
    ]
    return "\n\n".join([table, *lines])


def figure(rows: list[dict[str, object]], caption: str) -> bytes:
    """Median wall time and peak tree RSS per size and gate mode, one bar per method (moemerge, mergekit-moe,
    copy, baseline): the summary table's rows as a picture."""
    from moemerge import plots  # matplotlib: only when a figure is asked for

    groups = list(dict.fromkeys(f"{row['size']} {row['gates']}" for row in rows))
    methods = list(dict.fromkeys(str(row["method"]) for row in rows))
    by = {(f"{row['size']} {row['gates']}", row["method"]): row for row in rows}

    def series(key: str) -> dict[str, list[float | None]]:
        return {m: [by[g, m][key] if (g, m) in by else None for g in groups] for m in methods}  # type: ignore[misc]

    charts = {
        "median wall time (s)": series("median_wall_s"),
        "peak RSS, process tree (GiB)": series("peak_tree_rss_gib"),
    }
    return plots.grouped_bars(groups, charts, caption)


def print_report(
    records: list[RunRecord],
    json_path: Path | None,
    extra: dict[str, object],
    markdown_path: Path | None = None,
    figure_path: Path | None = None,
) -> None:
    """The markdown table and the pair ratios on stdout; everything as JSON to `json_path`, the table with the
    pair ratios to `markdown_path` and its figure to `figure_path` if given."""
    rows = summarize(records)
    ratios = pair_ratios(records)
    revisions = sorted({r.revision for r in records if r.method == "baseline"})
    report = report_markdown(rows, ratios, revisions)
    print(report)
    if markdown_path:
        markdown_path.write_text(report + "\n")
    if json_path:
        report = {**extra, "summary": rows, "pair_ratios": ratios, "runs": [asdict(r) for r in records]}
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if figure_path:
        runs_of = ", ".join(Path(p).name for p in extra.get("combined", []))  # type: ignore[union-attr]
        caption = f"merge speed and memory, {extra.get('date') or runs_of}"
        figure_path.write_bytes(figure(rows, caption))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.combine:
        print_report(
            combined_runs(args.combine),
            args.json,
            {"combined": [str(p) for p in args.combine]},
            args.markdown,
            args.figure,
        )
        return
    tools = {"moemerge": find_moemerge(args.moemerge)}
    if "baseline" in args.methods:
        tools["baseline"] = tools["moemerge"]
    if "mergekit" in args.methods:
        mergekit = find_mergekit(args.mergekit)
        if mergekit is None:
            print("mergekit-moe not found; measuring moemerge only", file=sys.stderr)
            args.methods.remove("mergekit")
        else:
            tools["mergekit"] = mergekit
    args.workdir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, object] = {}
    if args.size != SMOLLM2:
        size = SIZES[args.size]
        moe = size.moe_params(args.experts)
        print(
            f"{size.name}: dense {size.params() / 1e9:.2f}B params, MoE of {args.experts} experts "
            f"{moe / 1e9:.2f}B ({2 * moe / 1e9:.2f} GB in bf16)",
            file=sys.stderr,
            flush=True,
        )
        extra = {"size": asdict(size), "dense_params": size.params(), "moe_params": moe}
    records: list[RunRecord] = []
    for gates in args.gates:
        records += benchmark_gates(args, gates, tools)
    if not args.keep_outputs:
        for method in METHODS:
            shutil.rmtree(args.workdir / "out" / method, ignore_errors=True)
    extra |= {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tools": {k: str(v) for k, v in tools.items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": version("torch")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    extra["command"] = [sys.executable, *sys.argv]
    print_report(records, args.json, extra, args.markdown, args.figure)


if __name__ == "__main__":
    main()
