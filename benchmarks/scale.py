"""How a simulated federation's time and memory grow with the number of clinics.

    python benchmarks/scale.py [--clinics 10,100,1000] [--rounds 10] [--patients-per-clinic N] [--dp]
                               [--no-policy] [--tree PATH] [--work /tmp/fednano-scale]
                               [--out benchmarks/results/scale.json]

For each size, runs ``fednano simulate --models ann --no-compare --clinics N --rounds R`` (DP off unless
``--dp``; default clinic sizes unless ``--patients-per-clinic``; ``--no-policy`` passed on) as a child process,
samples the resident memory of its whole process tree (the driver, Ray's processes and its actors) every 0.5 s
from ``/proc``, and reads the run's own timing: ``results.json`` ``timing`` (making the sites, federation,
baselines, evaluating the policy) and the coordinator's seconds per phase (``federation.json``
``phase_seconds``). ``--tree`` runs another source tree's ``fednano`` (e.g. a
``git worktree`` of an older commit: "before" figures; an older tree may lack the per-phase timing). Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process descended from it (read from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            resident = int((entry / "statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = resident
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run(n_clinics: int, rounds: int, patients: int | None, dp: bool, work: Path, tree: Path = ROOT,
        policy: bool = True) -> dict:
    out = work / f"clinics-{n_clinics}"
    command = [str(Path(sys.executable).with_name("fednano")), "simulate", "--models", "ann", "--no-compare",
               "--clinics", str(n_clinics), "--rounds", str(rounds), "--out", str(out), "--dp" if dp else "--no-dp"]
    if patients:
        command += ["--patients-per-clinic", str(patients)]
    if not policy:
        command.append("--no-policy")
    peak = 0
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tree), "FLWR_HOME": str(work / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    child = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True)
    reader.start()
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - started
    reader.join(timeout=5)
    row = {"clinics": n_clinics, "rounds": rounds, "dp": dp, "returncode": child.returncode, "wall_s": wall,
           "peak_rss_gib": peak / 2**30, "command": " ".join(command[1:])}
    if child.returncode != 0:
        row["stderr_tail"] = "".join(errors)[-3000:]
        return row
    results = json.loads((out / "results.json").read_text())
    record = json.loads((out / "federated" / "federation.json").read_text())
    episodes = sum(max(len(f.read_text().splitlines()) - 1, 0) for f in (out / "sites").glob("*/episodes.csv"))
    row |= {"timing": results["timing"], "federation_s": results["timing"]["federation_s"],
            "baselines_s": results["timing"]["baselines_s"], "phase_seconds": record.get("phase_seconds", {}),
            "sites": len(results["sites"]), "episodes": episodes}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clinics", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--patients-per-clinic", type=int)
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--no-policy", dest="policy", action="store_false")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the source tree whose fednano runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fednano-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.clinics.split(",")):
        rows.append(run(n, args.rounds, args.patients_per_clinic, args.dp, args.work, args.tree.resolve(),
                        args.policy) | {
            "tree": str(args.tree)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stderr_tail"}), flush=True)
        if rows[-1]["returncode"] != 0:
            print(rows[-1]["stderr_tail"], file=sys.stderr)
    phases = list(dict.fromkeys(p for row in rows for p in row.get("phase_seconds", {})))
    table = Table(title=f"fednano simulate --models ann --no-compare, {args.rounds} rounds (seconds, GiB)")
    for column in ("clinics", "episodes", "wall", "sites", "federation", *phases, "baselines", "policy eval.",
                   "peak RSS"):
        table.add_column(column, justify="right")
    for row in rows:
        timing = row.get("timing", {})
        cells = [timing.get("sites_s"), row.get("federation_s"), *(row.get("phase_seconds", {}).get(p) for p in phases),
                 row.get("baselines_s"), timing.get("policy_evaluation_s")]
        shown = ["–" if c is None else f"{c:.1f}" for c in cells]
        table.add_row(str(row["clinics"]), str(row.get("episodes", "–")), f"{row['wall_s']:.0f}", *shown,
                      f"{row['peak_rss_gib']:.2f}")
    Console(width=200).print(table)
    write_record(args.out, " ".join(["python", *sys.argv]), {"rows": rows})


if __name__ == "__main__":
    main()
