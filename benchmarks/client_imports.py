"""What a deployed message pays before its handler runs: a fresh interpreter importing the ClientApp.

    python benchmarks/client_imports.py [--before PATH] [--repeats 7] [--out benchmarks/results/client_imports.json]

Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process for every message, so the ClientApp's import
is paid per message. Each repeat starts ``python -c "import client.app"`` from this checkout and, with
``--before``, from an older tree (e.g. ``git worktree add /tmp/before <commit>``), alternately, so both see the
same machine load; a third command imports the ClientApp and then torch and Opacus, what a DP site's training
message loads. Prints a table (median and range, seconds) and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = {
    "client.app": "import client.app",
    "client.app + torch + opacus (a DP site's training message)": "import client.app, torch, opacus",
}


def seconds(tree: Path, code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, capture_output=True,
                   env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an older source tree to measure beside this one")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "client_imports.json")
    args = parser.parse_args()
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    cells = [(tree, label) for tree in trees for label in IMPORTS if tree == "this tree" or label == "client.app"]
    times: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):
        for tree, label in cells:  # interleaved: the same load for every cell
            times[(tree, label)].append(seconds(trees[tree], IMPORTS[label]))
    table = Table(title=f"Fresh-process import, {args.repeats} repeats (s)")
    for column in ("tree", "imports", "median", "min", "max"):
        table.add_column(column)
    results = []
    for (tree, label), values in times.items():
        row = {"tree": tree, "imports": label, "median_s": statistics.median(values), "min_s": min(values),
               "max_s": max(values), "seconds": values}
        results.append(row)
        table.add_row(tree, label, *(f"{row[k]:.2f}" for k in ("median_s", "min_s", "max_s")))
    Console().print(table)
    if args.before:
        ratio = times[("this tree", "client.app")], times[("before", "client.app")]
        print(f"client.app: this tree / before = {statistics.median(ratio[0]) / statistics.median(ratio[1]):.2f}")
    write_record(args.out, " ".join(["python", *sys.argv]), {"rows": results}, trees={k: str(v) for k, v in
                                                                                         trees.items()})


if __name__ == "__main__":
    main()
