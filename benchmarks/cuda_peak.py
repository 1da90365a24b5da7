"""Run a console script (moemerge, mergekit-moe) in this interpreter and write its peak GPU memory as it exits.

    python benchmarks/cuda_peak.py PEAK_FILE SCRIPT [ARGS...]

torch.cuda.max_memory_allocated counts one process's allocations, so merge_speed.py --device cuda cannot
read it from outside: this runs SCRIPT as __main__ in the same process and, at exit, writes the peak in
bytes (0 when CUDA was never initialised) to PEAK_FILE.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def write_peak(peak_file: Path) -> None:
    torch = sys.modules.get("torch")
    used = torch is not None and torch.cuda.is_initialized()
    peak_file.write_text(f"{torch.cuda.max_memory_allocated() if used else 0}\n")


def main() -> None:
    peak_file, script, *arguments = sys.argv[1:]
    atexit.register(write_peak, Path(peak_file))
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
