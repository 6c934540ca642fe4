"""How fast the command-line tools answer `--help` and a recipe error, against `python -c "import torch"`.

    python tools/bench_cli.py [--rounds 7]

Every command runs in a fresh interpreter of this environment, the commands interleaved round by round
(this machine's load drifts); the table gives the median wall time of each and its ratio to the torch
import measured in the same rounds. Target (issue 12): at most 0.5x for `--help` and a recipe error.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SCRIPTS = Path(sys.executable).parent

# A recipe that is whole but for one typo in the method's own section: refused before torch loads.
BAD_RECIPE = {
    "method": "tinyvit", "student": {"model": "tiny_vit_5m_224"}, "data": {"train": "digits", "val": "digits"},
    "epochs": 1, "batch_size": 64, "output_dir": "runs/never", "teacher": {"source": "store:runs/teacher.zarr"},
    "loss": {"temprature": 2.0},
}  # fmt: skip


def commands(recipe: Path) -> dict[str, list[str]]:
    return {
        "python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
        'python -c "import torch" (baseline)': [sys.executable, "-c", "import torch"],
        "distill-train --help": [str(SCRIPTS / "distill-train"), "--help"],
        "distill-train RECIPE (loss.temprature typo)": [str(SCRIPTS / "distill-train"), str(recipe)],
        "distill-save-logits --help": [str(SCRIPTS / "distill-save-logits"), "--help"],
        "distill-store --help": [str(SCRIPTS / "distill-store"), "--help"],
    }


def seconds(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "bad.yaml"
        recipe.write_text(yaml.safe_dump(BAD_RECIPE))
        cmds = commands(recipe)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for cmd in cmds.values():  # warm the page cache once
            seconds(cmd)
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                times[name].append(seconds(cmd))
    baseline = statistics.median(times['python -c "import torch" (baseline)'])
    print(f"{'command':<46} {'median s':>9} {'/ import torch':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<46} {median:>9.3f} {median / baseline:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
