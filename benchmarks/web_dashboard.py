"""Benchmark of the coordinator's dashboard (issue 15's measure): page load on a finished run, refresh cost live.

    python benchmarks/web_dashboard.py --dashboard RUNS_DIR [--run KEY] [--loads 20]
                                       [--live-clinics 10] [--poll-seconds 0 5 1 0]

1. **page load** of a finished run under RUNS_DIR (``--run``, else the finished run with the most sites) and of
   the index: the dashboard served by uvicorn on 127.0.0.1 (a thread of this process);
   - *server time*: wall time of ``GET`` over one kept-alive httpx connection until the whole body is read,
     median and p95 of ``--loads`` requests after 3 warm-up ones;
   - *browser time*: Debian's headless Chromium (the browser tests' options: nothing but 127.0.0.1 reachable)
     opening the page max(5, loads // 2) times; from Navigation Timing (``performance.getEntriesByType("navigation")``):
     time to first byte (``responseStart``), DOM content loaded and load event end, all from navigation start.
2. **refresh cost while a simulation runs** (with ``--live-clinics N``): ``fednano simulate --clinics N --models
   ann --no-compare --seed 0`` in a subprocess into RUNS_DIR, once per
   ``--poll-seconds`` value (default 0 5 1 0: unpolled, every 5 s, every 1 s, unpolled again, so the two
   unpolled runs show the noise) with a client asking ``/api/state?run=<key>`` at that interval (what an open
   run page does every 5 s; 1 s is a five-fold stress). Reports the endpoint's time (median, p95, max) and the
   simulation's wall time with and without polling.

Prints a table and writes ``benchmarks/results/web_pages_dashboard.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from record import machine, write_record

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.dashboard import find_runs, load_run, make_dashboard  # noqa: E402
from tests.browser import CHROMIUM, chromium, served  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "web_pages_dashboard.json"
NAVIGATION = """const n = performance.getEntriesByType("navigation")[0];
return {ttfb: n.responseStart, dom: n.domContentLoadedEventEnd, load: n.loadEventEnd, bytes: n.transferSize};"""


def summary(seconds: list[float]) -> dict[str, float]:
    """Median, p95 and max in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "median_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
            "max_ms": ms[-1]}


def server_times(base: str, path: str, loads: int) -> dict:
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(3):
            client.get(path).raise_for_status()
        times, size = [], 0
        for _ in range(loads):
            start = time.perf_counter()
            response = client.get(path)
            response.read()
            times.append(time.perf_counter() - start)
            response.raise_for_status()
            size = len(response.content)
    return {**summary(times), "bytes": size}


def browser_times(base: str, path: str, loads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fednano-bench-chromium-") as folder, chromium(Path(folder)) as driver:
        driver.get(base + path)  # warm-up (Chromium's own start)
        entries = []
        for _ in range(loads):
            driver.get("about:blank")
            driver.get(base + path)
            entries.append(driver.execute_script(NAVIGATION))
    return {key: statistics.median(e[key] for e in entries) for key in ("ttfb", "dom", "load")} | {
        "load_p95": sorted(e["load"] for e in entries)[min(loads - 1, int(0.95 * loads))], "n": loads}


def page_load(runs_dir: Path, key: str | None, loads: int) -> dict:
    runs = [r for r in find_runs(runs_dir) if key is None or r.key == key]
    finished = [(r, load_run(r)) for r in runs]
    finished = [(r, v) for r, v in finished if v.state == "finished" and v.sites]
    if not finished:
        raise SystemExit(f"no finished run{' ' + key if key else ''} with a readable record under {runs_dir}")
    run, view = max(finished, key=lambda rv: len(rv[1].sites))
    with served(make_dashboard(runs_dir)) as base:
        result = {"run": run.key, "sites": len(view.sites), "rounds": view.rounds_done, "pages": {}}
        for name, path in (("run page", f"/runs/{run.key}"), ("index", "/"), ("refresh endpoint", "/api/state")):
            result["pages"][name] = {"path": path, "server": server_times(base, path, loads)}
            if name != "refresh endpoint":
                result["pages"][name]["browser"] = browser_times(base, path, max(5, loads // 2))
        start = time.perf_counter()
        for _ in range(loads):
            load_run(run)
        result["view_build_ms"] = (time.perf_counter() - start) / loads * 1000
    return result


def simulate(out: Path, clinics: int) -> float:
    """Wall time of one ``fednano simulate`` in a subprocess (its output thrown away)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fednano.cli", "simulate", "--clinics", str(clinics), "--models", "ann",
               "--no-compare", "--seed", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def poll(base: str, key: str, interval: float, stop: threading.Event, times: list[float], states: list[str]) -> None:
    """Ask ``/api/state?run=<key>`` every ``interval`` seconds until ``stop``, timing each answer."""
    with httpx.Client(base_url=base, timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            answer = client.get("/api/state", params={"run": key})
            times.append(time.perf_counter() - start)
            if answer.status_code == 200:
                states.append(answer.json()["runs"][0]["state"])
            stop.wait(interval)


def live(runs_dir: Path, clinics: int, intervals: list[float]) -> dict:
    """One simulation per interval (0: nobody polls), its wall time, and the refresh endpoint's time meanwhile;
    with the machine's 1-min load average before each (other work on the machine moves wall times too)."""
    result = {"clinics": clinics, "runs": []}
    for i, interval in enumerate(intervals):
        key = f"live-{i}-{'unpolled' if interval <= 0 else format(interval, 'g') + 's'}"
        times: list[float] = []
        states: list[str] = []
        stop = threading.Event()
        load = os.getloadavg()[0]
        with served(make_dashboard(runs_dir)) as base:
            poller = threading.Thread(target=poll, args=(base, key, interval, stop, times, states), daemon=True)
            if interval > 0:
                poller.start()
            try:
                wall = simulate(runs_dir / key, clinics)
            finally:
                stop.set()
                if interval > 0:
                    poller.join(timeout=30)
        result["runs"].append({"interval_s": interval, "wall_s": wall, "load1_before": load,
                               "endpoint": summary(times) if times else None, "states_seen": sorted(set(states))})
    return result


def table(result: dict) -> str:
    lines = [f"dashboard page load: run {result['page_load']['run']} ({result['page_load']['sites']} sites, "
             f"{result['page_load']['rounds']} rounds); view built in {result['page_load']['view_build_ms']:.1f} ms",
             f"{'page':<18}{'bytes':>9}{'server median':>15}{'server p95':>12}{'browser TTFB':>14}"
             f"{'DOM loaded':>12}{'load':>9}"]
    for name, page in result["page_load"]["pages"].items():
        s, b = page["server"], page.get("browser")
        browser = (f"{b['ttfb']:>11.1f} ms{b['dom']:>9.1f} ms{b['load']:>6.1f} ms" if b
                   else f"{'–':>14}{'–':>12}{'–':>9}")
        lines.append(f"{name:<18}{s['bytes']:>9}{s['median_ms']:>12.1f} ms{s['p95_ms']:>9.1f} ms{browser}")
    if "live" in result:
        lv = result["live"]
        unpolled = [r["wall_s"] for r in lv["runs"] if r["interval_s"] <= 0]
        reference = statistics.mean(unpolled) if unpolled else None
        lines += ["", f"refresh while a {lv['clinics']}-clinic simulation runs (fednano simulate --models ann "
                      "--no-compare); load = 1-min load average before the run",
                  f"{'polling':<22}{'load':>6}{'sim wall':>10}{'vs unpolled mean':>18}{'requests':>10}"
                  f"{'median':>10}{'p95':>10}{'max':>10}"]
        for r in lv["runs"]:
            e = r["endpoint"]
            name = "none" if r["interval_s"] <= 0 else f"/api/state every {r['interval_s']:g} s"
            delta = "–" if reference is None else f"{r['wall_s'] - reference:+.1f} s"
            figures = (f"{e['n']:>10}{e['median_ms']:>7.1f} ms{e['p95_ms']:>7.1f} ms{e['max_ms']:>7.1f} ms" if e
                       else f"{'–':>10}{'–':>10}{'–':>10}{'–':>10}")
            lines.append(f"{name:<22}{r['load1_before']:>6.1f}{r['wall_s']:>8.1f} s{delta:>18}{figures}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", type=Path, required=True, metavar="RUNS_DIR")
    parser.add_argument("--run", help="the finished run to load (default: the one with the most sites)")
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--live-clinics", type=int, default=0, help="also measure the refresh during a simulation")
    parser.add_argument("--poll-seconds", type=float, nargs="+", default=[0.0, 5.0, 1.0, 0.0],
                        help="one simulation per value, polled at that interval (0: not polled)")
    args = parser.parse_args()
    result = {"page_load": page_load(args.dashboard, args.run, args.loads)}
    if args.live_clinics:
        result["live"] = live(args.dashboard, args.live_clinics, args.poll_seconds)
    result["load_average_at_end"] = os.getloadavg()
    print(table(result))
    write_record(OUT, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), result,
                 machine=machine(chromium=subprocess.run([CHROMIUM, "--version"], capture_output=True,
                                                         text=True).stdout.strip()))
    print(json.dumps({"out": str(OUT)}))


if __name__ == "__main__":
    main()
