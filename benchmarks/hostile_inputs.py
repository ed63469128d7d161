"""Benchmark of hostile inputs (issue 14 items 6 and 10): what an absurd site file or HTTP request costs.

    python benchmarks/hostile_inputs.py [--tree PATH] [--cases validation,service] [--quick]
                                        [--out benchmarks/results/hostile_inputs.json]
    python benchmarks/hostile_inputs.py --compare BEFORE.json AFTER.json [--out MERGED.json]

``--tree`` is the source tree measured (default: this checkout), e.g. a ``git worktree`` of an older commit,
so the same script gives "before" and "after" figures. It drives that tree only through its stable
interfaces, each in a fresh child process with ``PYTHONPATH=TREE``: the ``fednano validate PATH`` and
``fednano simulate-data`` / ``simulate`` commands, ``fednano serve`` over HTTP, and
``shared.validation.load_site`` (skipped if the tree has no such function).

**validation** (item 10). From a valid simulated site (``fednano simulate-data --clinics 1 --seed 0
--patients-per-clinic 400``): the site itself; episodes.csv with a header of 10^4, 3·10^4 and 10^6 columns
(10 data rows); episodes.csv of about 200 MB (40 MB with ``--quick``) made by repeating the site's rows with
fresh episode and patient ids, and once with the ids repeated (duplicates). For each, ``fednano validate``
(and ``load_site`` where it returns tables): wall time, CPU time and peak RSS of the child
(``os.wait4`` rusage), exit code and the size of what it printed. A child still running at the timeout is
killed and recorded as such.

**service** (item 6). A signed policy from ``fednano simulate --clinics 3 --rounds 1 --no-compare
--models ann`` with the measured tree (cached per commit under ``--work``), served by ``fednano serve
--policy BUNDLE --trust KEY`` on 127.0.0.1 (a free port), a fresh server per case: one ordinary
``examples/patient.json`` request first (its figures are the reference row), then the hostile request:
a 2.4 MB body whose catalogue has 300,000 items to ``POST /recommend``, or 100,000 copies of the example
to ``POST /recommend/batch``. Measured: request wall time, HTTP status, response bytes, the server's CPU
time during the request and its peak RSS (``/proc/PID/status`` VmHWM, polled every 0.1 s); a request not
answered within ``--request-timeout`` (180 s) or a server that dies is recorded as that.

Prints a markdown table per case group (before | after with ``--compare``) and writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from record import machine, write_record

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
EXAMPLE = "examples/patient.json"
WIDE_COLUMNS = (10_000, 30_000, 1_000_000)
WIDE_ROWS = 10
BIG_MB, QUICK_MB = 200, 40
CATALOGUE_ITEMS = 300_000
BATCH_RECORDS = 100_000
LOAD_SITE = """
import sys
from shared.validation import SiteDataError, load_site
try:
    site = load_site(sys.argv[1])
except SiteDataError as err:
    print("SiteDataError", len(str(err)), "chars")
else:
    print("rows", len(site.episodes), "frame_bytes", int(site.episodes.memory_usage(deep=True).sum()))
"""


# ---------------------------------------------------------------------------------------------------------
# Children: run, time, measure


def child_env(tree: Path) -> dict[str, str]:
    """The environment of a child running ``tree``'s code: only its PYTHONPATH, a fixed console width."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"PYTHONPATH": str(tree), "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}


def run_child(command: list[str], tree: Path, cwd: Path, output: Path, timeout: float) -> dict[str, Any]:
    """Run ``command``; its stdout and stderr go to ``output``. Wall, CPU (user + system) and peak RSS of the
    child from ``os.wait4``; a child past ``timeout`` is killed (by its PID) and marked ``timed_out``."""
    with open(output, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=child_env(tree), stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; stop Popen from waiting again
    text = output.read_bytes()
    lines = [line for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return {
        "exit_code": None if timed_out else proc.returncode, "timed_out": timed_out, "timeout_s": timeout,
        "wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "user_s": round(usage.ru_utime, 3), "system_s": round(usage.ru_stime, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "output_bytes": len(text), "output_lines": len(lines),
        "last_line": lines[-1][:200] if lines else "",
    }


def fednano(*args: str) -> list[str]:
    return [PYTHON, "-m", "fednano.cli", *args]


def tree_info(tree: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()
    return {"path": str(tree), "commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def has_load_site(tree: Path, work: Path) -> bool:
    probe = subprocess.run([PYTHON, "-c", "from shared.validation import SiteDataError, load_site"], cwd=work,
                           env=child_env(tree), capture_output=True)
    return probe.returncode == 0


# ---------------------------------------------------------------------------------------------------------
# Validation cases (item 10)


def source_site(tree: Path, work: Path) -> Path:
    """The valid 400-patient site the cases are made from, simulated with ``tree``."""
    out = work / f"site-{tree_info(tree)['commit'][:12]}"
    if not (out / "clinic_00" / "episodes.csv").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(fednano("simulate-data", "--clinics", "1", "--seed", "0", "--out", str(out),
                               "--patients-per-clinic", "400"),
                       cwd=work, env=child_env(tree), check=True, stdout=subprocess.DEVNULL)
    return out / "clinic_00"


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def make_cases(site: Path, work: Path, big_mb: int) -> tuple[dict[str, dict[str, Any]], str]:
    """The case folders (cached under ``work`` by the source site's bytes); their name → description."""
    digest = _digest(site / "episodes.csv", site / "vitals.csv", site / "site.toml")
    folder = work / f"cases-{digest[:12]}"
    index = folder / f"index-{big_mb}.json"
    if index.is_file():
        return json.loads(index.read_text()), digest
    folder.mkdir(parents=True, exist_ok=True)
    with open(site / "episodes.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:]
    cases: dict[str, dict[str, Any]] = {"valid_site": {
        "path": str(site), "input": f"the valid site: {len(data):,} episodes", "rows": len(data),
        "columns": len(header), "episodes_bytes": (site / "episodes.csv").stat().st_size, "load_site": True}}
    for n in WIDE_COLUMNS:
        name = f"columns_{n}"
        case = folder / name
        case.mkdir(exist_ok=True)
        shutil.copy(site / "site.toml", case)
        extra = n - len(header)
        with open(case / "episodes.csv", "w", newline="") as f:
            f.write(",".join(header + [f"x{i}" for i in range(extra)]) + "\n")
            for r in data[:WIDE_ROWS]:
                f.write(",".join(r) + "," * extra + "\n")
        cases[name] = {"path": str(case), "input": f"header of {n:,} columns, {WIDE_ROWS} rows",
                       "rows": WIDE_ROWS, "columns": n, "episodes_bytes": (case / "episodes.csv").stat().st_size,
                       "load_site": False, "wide": True}
    e, p = header.index("episode_id"), header.index("patient_id")
    for unique in (True, False):
        name = f"{'fresh' if unique else 'repeated'}_ids_{big_mb}mb"
        case = folder / name
        case.mkdir(exist_ok=True)
        shutil.copy(site / "site.toml", case)
        shutil.copy(site / "vitals.csv", case)
        written, copies, n_rows = 0, 0, 0
        with open(case / "episodes.csv", "w", newline="") as f:
            f.write(",".join(header) + "\n")
            while written < big_mb * 1_000_000:
                for r in data:
                    if unique and copies:
                        r = list(r)
                        r[e] += f"-r{copies}"
                        r[p] += f"-r{copies}"
                    line = ",".join(r) + "\n"
                    f.write(line)
                    written += len(line)
                    n_rows += 1
                copies += 1
        what = "fresh episode and patient ids" if unique else "the same ids repeated"
        cases[name] = {"path": str(case), "input": f"{big_mb} MB episodes.csv, {n_rows:,} rows, {what}",
                       "rows": n_rows, "columns": len(header), "copies": copies,
                       "episodes_bytes": (case / "episodes.csv").stat().st_size, "load_site": unique}
    index.write_text(json.dumps(cases, indent=2))
    return cases, digest


def validation(tree: Path, work: Path, big_mb: int, timeout: float, wide_timeout: float) -> dict[str, Any]:
    site = source_site(tree, work)
    cases, digest = make_cases(site, work, big_mb)
    load_ok = has_load_site(tree, work)
    print("validation: start-up only (fednano validate --help)", flush=True)
    startup = run_child(fednano("validate", "--help"), tree, work, work / "last_output.txt", wide_timeout)
    print(f"  {_brief(startup)}", flush=True)
    results: dict[str, Any] = {}
    for name, case in cases.items():
        limit = wide_timeout if case.get("wide") else timeout
        print(f"validation {name}: fednano validate (timeout {limit:.0f} s)", flush=True)
        entry = {k: v for k, v in case.items() if k not in ("path", "load_site", "wide")}
        entry["validate"] = run_child(fednano("validate", case["path"]), tree, work, work / "last_output.txt", limit)
        print(f"  {_brief(entry['validate'])}", flush=True)
        if case["load_site"] and load_ok:
            print(f"validation {name}: load_site", flush=True)
            entry["load_site"] = run_child([PYTHON, "-c", LOAD_SITE, case["path"]], tree, work,
                                           work / "last_output.txt", limit)
            print(f"  {_brief(entry['load_site'])}", flush=True)
        results[name] = entry
    return {"source_site_sha256": digest, "big_mb": big_mb, "load_site_available": load_ok, "startup": startup,
            "cases": results}


def _brief(r: dict[str, Any]) -> str:
    state = f"killed at {r['timeout_s']:.0f} s" if r["timed_out"] else f"exit {r['exit_code']}"
    return (f"{state}, wall {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"output {r['output_bytes']:,} B")


# ---------------------------------------------------------------------------------------------------------
# Service cases (item 6)


def policy_for(tree: Path, work: Path) -> tuple[Path, Path]:
    """The signed bundle and trust key of a small simulated federation run with ``tree`` (cached)."""
    out = work / f"policy-{tree_info(tree)['commit'][:12]}"
    results = out / "results.json"
    if not results.is_file():
        shutil.rmtree(out, ignore_errors=True)
        print(f"simulating a policy with {tree} (fednano simulate --clinics 3 --rounds 1 --models ann)", flush=True)
        subprocess.run(fednano("simulate", "--out", str(out), "--clinics", "3", "--rounds", "1", "--no-compare",
                               "--models", "ann"),
                       cwd=work, env=child_env(tree), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    policy = json.loads(results.read_text())["policy"]
    return Path(policy["bundle"]), Path(policy["trust_key"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory(pid: int) -> dict[str, float] | None:
    """VmRSS and VmHWM of ``pid`` in MiB, None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {line.split(":")[0]: line.split()[1] for line in lines if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mib": int(fields["VmRSS"]) / 1024, "hwm_mib": int(fields["VmHWM"]) / 1024} if fields else None


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``fednano serve`` of one tree on 127.0.0.1, a child process stopped by its PID."""

    def __init__(self, tree: Path, work: Path, bundle: Path, trust: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            fednano("serve", "--policy", str(bundle), "--trust", str(trust), "--host", "127.0.0.1",
                    "--port", str(self.port)),
            cwd=work, env=child_env(tree), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def wait_ready(self, client, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fednano serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                response = client.get(f"{self.url}/health", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.3)
        raise RuntimeError(f"fednano serve did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def timed_request(client, server: Server, path: str, body: bytes, timeout: float) -> dict[str, Any]:
    """POST ``body``; wall time, status, response size, the server's CPU time and peak RSS meanwhile."""
    pid = server.proc.pid
    before_mem, before_cpu = proc_memory(pid), proc_cpu(pid)
    seen = {"hwm_mib": before_mem["hwm_mib"], "cpu_s": before_cpu}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            mem, cpu = proc_memory(pid), proc_cpu(pid)
            if mem is not None:
                seen["hwm_mib"] = max(seen["hwm_mib"], mem["hwm_mib"])
            if cpu is not None:
                seen["cpu_s"] = cpu
            done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    result: dict[str, Any] = {"path": path, "body_bytes": len(body)}
    start = time.perf_counter()
    try:
        response = client.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"},
                               timeout=timeout)
        result |= {"status": response.status_code, "response_bytes": len(response.content),
                   "response_start": response.text[:160]}
    except Exception as err:  # noqa: BLE001 - a timeout or a dead server is the figure
        result |= {"status": None, "error": f"{type(err).__name__}: {str(err)[:160]}"}
    result["wall_s"] = round(time.perf_counter() - start, 3)
    time.sleep(0.3)
    done.set()
    poller.join()
    after_mem = proc_memory(pid)
    if after_mem is not None:
        seen["hwm_mib"] = max(seen["hwm_mib"], after_mem["hwm_mib"])
    alive = server.proc.poll() is None
    result |= {"server_alive_after": alive, "server_exit_code": None if alive else server.proc.returncode,
               "timed_out": "Timeout" in result.get("error", ""),
               "server_rss_before_mib": round(before_mem["rss_mib"], 1),
               "server_peak_rss_mib": round(seen["hwm_mib"], 1),
               "server_cpu_s": round(seen["cpu_s"] - before_cpu, 3)}
    return result


def service(tree: Path, work: Path, timeout: float) -> dict[str, Any]:
    import httpx

    bundle, trust = policy_for(tree, work)
    example = json.loads((tree / EXAMPLE).read_text())
    results: dict[str, Any] = {"bundle": str(bundle), "trust_key": str(trust)}
    cases = ("catalogue_300k", "batch_100k")
    for name in cases:
        server = Server(tree, work, bundle, trust, work / f"serve-{name}.log")
        try:
            with httpx.Client() as client:
                started = time.perf_counter()
                health = server.wait_ready(client)
                startup = time.perf_counter() - started
                formulations = health["formulations"]
                record = example | {"catalogue": formulations[:3]}
                results.setdefault("formulations", formulations)
                print(f"service {name}: server pid {server.proc.pid} ready in {startup:.1f} s; reference request",
                      flush=True)
                reference = timed_request(client, server, "/recommend", json.dumps(record).encode(), timeout)
                if name == cases[0]:
                    results["reference"] = reference | {"input": "one examples/patient.json, 3 formulations",
                                                        "server_startup_s": round(startup, 2)}
                if name == "catalogue_300k":
                    items = [formulations[i % len(formulations)] for i in range(CATALOGUE_ITEMS)]
                    body = json.dumps(record | {"catalogue": items}).encode()
                    path, what = "/recommend", f"one record, catalogue of {CATALOGUE_ITEMS:,} items"
                else:
                    body = json.dumps([record] * BATCH_RECORDS).encode()
                    path, what = "/recommend/batch", f"{BATCH_RECORDS:,} copies of the example record"
                print(f"service {name}: POST {path} with {len(body) / 1e6:.1f} MB (timeout {timeout:.0f} s)",
                      flush=True)
                entry = timed_request(client, server, path, body, timeout)
                results[name] = entry | {"input": what}
                print(f"  status {entry['status']}, {entry['wall_s']:.2f} s, server CPU {entry['server_cpu_s']:.2f} s,"
                      f" RSS {entry['server_rss_before_mib']:.0f} -> peak {entry['server_peak_rss_mib']:.0f} MiB, "
                      f"response {entry.get('response_bytes', 0):,} B", flush=True)
        finally:
            server.stop()
    return results


# ---------------------------------------------------------------------------------------------------------
# Tables


def _seconds(r: dict[str, Any] | None, key: str = "wall_s") -> str:
    if r is None:
        return "–"
    if r.get("timed_out"):
        return f"> {r.get('timeout_s', r.get('wall_s')):.0f}" if key == "wall_s" else f"{r[key]:.1f}"
    return f"{r[key]:.2f}"


def _validation_cells(entry: dict[str, Any] | None, kind: str) -> list[str]:
    r = None if entry is None else entry.get(kind)
    if r is None:
        return ["–"] * 5
    exit_code = "killed" if r["timed_out"] else str(r["exit_code"])
    if kind == "load_site":  # what it returned: "rows N frame_bytes B" or "SiteDataError ..."
        words = r["last_line"].split()
        shown = (f"{int(words[1]):,} rows, {int(words[3]) / 2**20:,.0f} MiB frame"
                 if len(words) == 4 and words[0] == "rows" else r["last_line"][:40])
    else:
        shown = f"{r['output_bytes']:,}"
    return [_seconds(r), _seconds(r, "cpu_s"), f"{r['peak_rss_mib']:,.0f}", exit_code, shown]


def _service_cells(r: dict[str, Any] | None) -> list[str]:
    if r is None:
        return ["–"] * 6
    if r.get("status") is None:
        status = "timeout" if r.get("timed_out") else ("server died" if not r.get("server_alive_after") else "error")
    else:
        status = str(r["status"])
    wall = f"> {r['wall_s']:.0f}" if r.get("timed_out") else f"{r['wall_s']:.2f}"
    return [status, wall, f"{r['server_cpu_s']:.2f}", f"{r['server_rss_before_mib']:,.0f}",
            f"{r['server_peak_rss_mib']:,.0f}", f"{r.get('response_bytes', 0):,}"]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(heads: list[str], labels: list[str], rows: list[tuple[str, list[list[str]]]], first: str) -> list[str]:
    """One markdown table; with several runs each cell reads ``run1 → run2`` and the heads say so."""
    suffix = f" ({' → '.join(labels)})" if len(labels) > 1 else ""
    lines = [_row([first, *[h + suffix for h in heads]]), _row(["---"] * (1 + len(heads)))]
    for name, per_run in rows:
        lines.append(_row([name, *[" → ".join(cells[i] for cells in per_run) for i in range(len(heads))]]))
    return lines


def tables(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of one run or of several side by side (``runs``: label → record)."""
    labels = list(runs)
    out: list[str] = []
    validations = {k: r["results"].get("validation") for k, r in runs.items()}
    if any(validations.values()):
        names = list(dict.fromkeys(n for v in validations.values() if v for n in v["cases"]))
        for kind in ("validate", "load_site"):
            shown = [n for n in names if any(v and kind in v["cases"].get(n, {}) for v in validations.values())]
            if not shown:
                continue
            title = "`fednano validate PATH`" if kind == "validate" else "`shared.validation.load_site(PATH)`"
            out.append(f"\n{title} (a fresh process each):\n")
            heads = ["wall s", "CPU s", "peak RSS MiB", "exit", "printed bytes" if kind == "validate" else "returned"]
            rows = []
            for n in shown:
                case_input = next(v["cases"][n]["input"] for v in validations.values() if v and n in v["cases"])
                rows.append((case_input, [_validation_cells(v["cases"].get(n) if v else None, kind)
                                          for v in validations.values()]))
            out += _table(heads, labels, rows, "case")
    startups = [(lab, v["startup"]) for lab, v in validations.items() if v and "startup" in v]
    if startups:
        out.append("\nstart-up alone (`fednano validate --help`): " + "; ".join(
            f"{lab} wall {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s, peak RSS {r['peak_rss_mib']:,.0f} MiB"
            for lab, r in startups))
    services = {k: r["results"].get("service") for k, r in runs.items()}
    if any(services.values()):
        out.append("\n`fednano serve` (a fresh server per hostile request, after one ordinary request):\n")
        heads = ["HTTP status", "wall s", "server CPU s", "server RSS at start MiB", "server peak RSS MiB",
                 "response bytes"]
        rows = []
        for n in ("reference", "catalogue_300k", "batch_100k"):
            entries = [s.get(n) if s else None for s in services.values()]
            first = next((e for e in entries if e), None)
            if first is None:
                continue
            size = first["body_bytes"]
            size_text = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
            rows.append((f"POST {first['path']}: {first['input']} ({size_text})", [_service_cells(e) for e in entries]))
        out += _table(heads, labels, rows, "request")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------


class LoadSampler:
    """The 1-minute load average every 30 s while the benchmark runs."""

    def __init__(self) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(30):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        s = self.samples
        return {"one_minute_samples": [round(x, 2) for x in s], "min": round(min(s), 2), "max": round(max(s), 2),
                "mean": round(sum(s) / len(s), 2)}


def compare(paths: list[Path], out: Path | None, labels: list[str]) -> None:
    runs = {lab: json.loads(p.read_text()) for lab, p in zip(labels, paths, strict=True)}
    digests = {r["results"].get("validation", {}).get("source_site_sha256") for r in runs.values()} - {None}
    if len(digests) > 1:
        print("warning: the runs' validation cases were made from different source sites")
    for lab, r in runs.items():
        t = r["tree"]
        load = r["load_average"]
        print(f"{lab}: {t['commit'][:12]} {t['subject']!r}{' (dirty)' if t['dirty'] else ''}; {r['date']}; "
              f"`{r['command']}`; load average {load['min']}–{load['max']} (mean {load['mean']})")
    print(tables(runs))
    if out is not None:
        command = "python benchmarks/hostile_inputs.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_record(out, command, {lab: r for lab, r in runs.items()}, compared={lab: str(p) for lab, p in
                                                                                    zip(labels, paths, strict=True)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="Source tree to measure (default: this checkout).")
    parser.add_argument("--cases", default="validation,service", help="validation, service or both.")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MB} MB instead of {BIG_MB} MB episodes.csv.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds per validation child (900).")
    parser.add_argument("--wide-timeout", type=float, default=180,
                        help="Seconds per validation child of a wide-header case (180).")
    parser.add_argument("--request-timeout", type=float, default=180, help="Seconds per HTTP request (180).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fednano-hostile-inputs",
                        help="Cache of the generated sites, cases and policies.")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"),
                        help="Print the two runs' tables side by side (and merge them into --out).")
    parser.add_argument("--labels", nargs=2, default=["before", "after"], help="Column labels for --compare.")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default benchmarks/results/hostile_inputs.json; none for --compare).")
    args = parser.parse_args()
    if args.compare:
        compare(list(args.compare), args.out, args.labels)
        return
    out = args.out or ROOT / "benchmarks" / "results" / "hostile_inputs.json"
    tree = args.tree.resolve()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(wanted) - {"validation", "service"}:
        parser.error(f"unknown cases: {', '.join(sorted(set(wanted) - {'validation', 'service'}))}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    big_mb = QUICK_MB if args.quick else BIG_MB
    info = tree_info(tree)
    print(f"tree {tree} at {info['commit'][:12]} {info['subject']!r}{' (dirty)' if info['dirty'] else ''}; "
          f"work {work}; {'--quick, ' if args.quick else ''}{big_mb} MB", flush=True)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with LoadSampler() as load:
        if "validation" in wanted:
            results["validation"] = validation(tree, work, big_mb, args.timeout, args.wide_timeout)
        if "service" in wanted:
            results["service"] = service(tree, work, args.request_timeout)
    print(f"load average (1 min) during the run: {load.summary()['min']}–{load.summary()['max']} "
          f"(mean {load.summary()['mean']}); {os.cpu_count()} CPUs; {time.perf_counter() - started:.0f} s")
    record = {"tree": info, "load_average": load.summary(), "results": results}
    print(tables({"run": record}))
    command = "python benchmarks/hostile_inputs.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_record(out, command, results, tree=info, quick=args.quick, big_mb=big_mb, load_average=load.summary(),
                 run_seconds=round(time.perf_counter() - started, 1), machine=machine())


if __name__ == "__main__":
    main()
