"""Benchmark of the telemedicine recommender: batched throughput and the latency of one HTTP request.

    python benchmarks/recommender.py [--policy BUNDLE --trust KEY] [--requests 500] [--batch 100 1000 5000]

Without ``--policy``, first runs ``fednano simulate --clinics 3 --rounds 2 --no-compare`` into a temporary
folder and uses the signed bundle and trust key it records (``results.json`` ``policy.bundle`` and
``policy.trust_key``). Then, with the policy verified and loaded once:

1. **throughput**: ``DosingPolicy.recommend`` on batches of validated patient records (variations of
   ``examples/patient.json`` drawn within the site-data contract), patients per second, median of 3 runs;
2. **latency**: a real uvicorn server on 127.0.0.1 (in a thread of this process, stopped at the end) and an
   httpx client sending one record per ``POST /recommend`` (and ``/recommend/fhir``) in sequence over one
   kept-alive connection; wall time per request, median / p95 / p99 after 20 warm-up requests.

Prints a table and writes ``benchmarks/results/recommender.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from record import machine, write_record

from client.recommender import load_policy
from client.service import make_app
from shared.patient_record import PatientRecord

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "patient.json"
TUMOURS = ("ovarian", "breast", "kaposi", "myeloma", "sarcoma")
WARM_UP = 20


def patient_dicts(n: int, formulations: list[str], seed: int = 0) -> list[dict]:
    """``n`` variations of the example patient: covariates, history and catalogue drawn within the contract."""
    rng = np.random.default_rng(seed)
    base = json.loads(EXAMPLE.read_text())
    records = []
    for i in range(n):
        height, weight = rng.uniform(150, 190), rng.uniform(45, 110)
        record = base | {
            "patient_id": f"bench-{i:06d}", "age_years": round(float(rng.uniform(25, 85)), 1),
            "height_cm": round(height, 1), "weight_kg": round(weight, 1),
            "bsa_m2": round(float(np.sqrt(height * weight / 3600)), 3),
            "bilirubin_umol_l": round(float(rng.lognormal(2.2, 0.5)), 1),
            "anc_baseline_e9_l": round(float(rng.uniform(0.8, 6.0)), 2), "ecog": int(rng.integers(0, 3)),
            "tumour_type": str(rng.choice(TUMOURS)),
            # a consistent history: the cumulative dose includes the previous cycle's (the recommender refuses less)
            "cumulative_dose_mg_m2": float(rng.integers(1, 12) * 40),
            "catalogue": sorted(rng.choice(formulations, size=min(3, len(formulations)), replace=False).tolist()),
        }
        record["wearable_summary"] = base["wearable_summary"] | {"fever_days": int(rng.random() < 0.1)}
        records.append(record)
    return records


def simulated_policy(folder: Path) -> tuple[Path, Path]:
    """Run a small simulation and return the bundle and trust key it records."""
    out = folder / "simulate"
    command = [sys.executable, "-m", "fednano.cli", "simulate", "--out", str(out), "--clinics", "3", "--rounds", "2",
               "--no-compare"]
    print("running", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    policy = json.loads((out / "results.json").read_text())["policy"]
    return Path(policy["bundle"]), Path(policy["trust_key"])


def throughput(policy, records: list[PatientRecord], batch_sizes: list[int]) -> dict[str, dict[str, float]]:
    """Patients per second of one batched ``recommend`` call per batch size (median of 3 runs), by wall
    time and by this process's CPU time (less sensitive to other jobs on a shared machine)."""
    results = {}
    policy.recommend(records[:10])  # first call: lazy imports, model warm-up
    for size in batch_sizes:
        batch = records[:size]
        wall, cpu = [], []
        for _ in range(3):
            start, start_cpu = time.perf_counter(), time.process_time()
            policy.recommend(batch)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
        results[str(size)] = {"seconds": seconds, "patients_per_s": size / seconds, "cpu_seconds": cpu_seconds,
                              "patients_per_cpu_s": size / cpu_seconds}
    return results


class ServerThread:
    """A uvicorn server on 127.0.0.1 (a free port) in a thread of this process; ``stop`` ends it."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the uvicorn server did not start within 30 s")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def latency(url: str, path: str, records: list[dict]) -> dict[str, float]:
    """Wall time of one POST per record over a kept-alive connection: median, p95, p99 in ms."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i, record in enumerate(records):
            if i == WARM_UP:
                start_cpu = time.process_time()
            start = time.perf_counter()
            response = client.post(path, json=record)
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
            if i >= WARM_UP:
                times.append(1000 * elapsed)
    cpu_ms = 1000 * (time.process_time() - start_cpu) / len(times)  # client and server: one process
    p95, p99 = np.percentile(times, [95, 99])
    return {"requests": len(times), "median_ms": statistics.median(times), "p95_ms": float(p95),
            "p99_ms": float(p99), "max_ms": max(times), "cpu_ms_per_request": cpu_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, help="Signed policy bundle (default: simulate one).")
    parser.add_argument("--trust", type=Path, help="Trust key of the bundle.")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recommender.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, trust = (args.policy, args.trust) if args.policy else simulated_policy(Path(tmp))
        start = time.perf_counter()
        policy = load_policy(bundle, trust)
        load_s = time.perf_counter() - start
        known = sorted(policy.formulations)
        dicts = patient_dicts(max(max(args.batch), args.requests + WARM_UP), known)
        records = [PatientRecord.model_validate(d) for d in dicts]
        batched = throughput(policy, records, args.batch)
        server = ServerThread(make_app(policy))
        url = server.start()
        try:
            http = {path: latency(url, path, dicts[:args.requests + WARM_UP])
                    for path in ("/recommend", "/recommend/fhir")}
        finally:
            server.stop()
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {_loads(load_before)}, after {_loads(load_after)}; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"policy version {policy.manifest.version}: verified and loaded in {load_s:.2f} s; "
          f"{len(policy.members)} outcome models ({', '.join(policy.members)}), {len(known)} formulations")
    print(f"{'batch':>8s} {'seconds':>9s} {'patients/s':>11s} {'CPU s':>7s} {'patients/CPU s':>15s}")
    for size, r in batched.items():
        print(f"{size:>8s} {r['seconds']:9.3f} {r['patients_per_s']:11.0f} {r['cpu_seconds']:7.3f} "
              f"{r['patients_per_cpu_s']:15.0f}")
    print(f"{'endpoint':18s} {'requests':>8s} {'median ms':>10s} {'p95 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
          f"{'CPU ms/req':>10s}")
    for path, r in http.items():
        print(f"{path:18s} {r['requests']:8d} {r['median_ms']:10.2f} {r['p95_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['max_ms']:8.2f} {r['cpu_ms_per_request']:10.2f}")
    write_record(args.out, "python benchmarks/recommender.py", {"throughput": batched, "latency": http,
                                                                 "load_s": load_s},
                 policy_version=policy.manifest.version, members=list(policy.members), formulations=known,
                 load_average={"before": load_before, "after": load_after},
                 machine=machine(torch_threads=torch.get_num_threads()))


def _loads(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
