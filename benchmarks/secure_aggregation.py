"""Benchmark of secure aggregation per round: time and bytes of a plain sum, pairwise masks only, and the
dropout-recovering protocol with 0, 1 and 2 sites lost. Prints a table, writes JSON.

    python benchmarks/secure_aggregation.py [--sites 10] [--repeats 3] [--out benchmarks/results/...json]

Every party runs in this one process, with the real code: ``shared.secure_sum`` (pairwise masks, the hist
phase before issue 16) and ``shared.secagg_plus`` (Bonawitz et al. §4: self-masks, Shamir-shared keys, AEAD
share channel). Vectors: 50 000 int64 entries (the histogram phase's level release is of that order) and
10 000 (an ANN update in fixed point), one 64-bit word per entry. Lost sites are lost *before* sending their
masked input, the costlier case for the server (it rebuilds their mask keys and recomputes their pairwise
masks with every sender); a site lost after sending costs one seed rebuild, as a survivor does.

Reported per case (median over ``--repeats``): ``site_s`` the mean compute time of one site over the round
(keys, shares, masking, unmask shares), ``server_s`` the server's (routing, unmasking, summing), and payload
bytes up (sites → server) and down (server → sites), no framing. Ratios: time (site + server) against
the pairwise-only round, bytes (up + down) against the plain sum. Plain: each site sends its vector; the server
sends nothing back (the sum is its own). Pairwise: public keys up, every key to every site, masked vectors up.
Wall times depend on the load; the JSON records the load average at the start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from shared import secagg_plus as sp
from shared import secure_sum as ss

SIZES = {"hist level (50k)": 50_000, "ANN update (10k)": 10_000}
WORD = 8
NODE_ID = 8
"""Bytes of a node id on the wire (int64 in a ConfigRecord list)."""


class Clock:
    """Seconds spent per party."""

    def __init__(self) -> None:
        self.seconds: dict[object, float] = {}

    def run(self, party: object, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[party] = self.seconds.get(party, 0.0) + time.perf_counter() - start
        return out


def plain(values: dict[int, np.ndarray]) -> dict:
    clock = Clock()
    total = clock.run("server", lambda: np.sum(np.stack(list(values.values())), axis=0, dtype=np.int64))
    assert np.array_equal(total, sum(values.values()))
    size = next(iter(values.values())).size
    return {"site_s": 0.0, "server_s": clock.seconds["server"], "bytes_up": len(values) * size * WORD,
            "bytes_down": 0}


def pairwise(values: dict[int, np.ndarray]) -> dict:
    clock = Clock()
    keys = {n: clock.run(n, ss.new_private_key) for n in values}
    public = {n: clock.run(n, ss.public_key, k) for n, k in keys.items()}
    masked = [clock.run(n, ss.mask, v, keys[n], n, public, "bench/1") for n, v in values.items()]
    total = clock.run("server", ss.unmask_sum, masked)
    assert np.array_equal(total, sum(values.values()))
    n, size = len(values), next(iter(values.values())).size
    return {"site_s": statistics.mean(clock.seconds[k] for k in values), "server_s": clock.seconds["server"],
            "bytes_up": n * 32 + n * size * WORD, "bytes_down": n * (n * (NODE_ID + 32))}


def recovering(values: dict[int, np.ndarray], lost: list[int]) -> dict:
    clock = Clock()
    nodes = sorted(values)
    n, size = len(nodes), next(iter(values.values())).size
    threshold = sp.default_threshold(n)
    sites = {node: clock.run(node, sp.SecAggSite, node, "bench/1") for node in nodes}
    advertised = {node: clock.run(node, site.advertise) for node, site in sites.items()}
    up = n * 64
    roster = clock.run("server", sp.Roster, "bench/1", threshold, {k: v[0] for k, v in advertised.items()},
                       {k: v[1] for k, v in advertised.items()})
    down = n * (8 + n * (NODE_ID + 64))  # the roster to every site
    outboxes = {node: clock.run(node, site.share, roster) for node, site in sites.items()}
    up += sum(len(c) + NODE_ID for box in outboxes.values() for c in box.values())
    inboxes = clock.run("server", sp.route_shares, outboxes)
    down += sum(len(c) + NODE_ID for box in inboxes.values() for c in box.values()) + n * n * NODE_ID
    masked = {}
    for node, site in sites.items():
        clock.run(node, site.receive, inboxes[node])
        if node not in lost:
            masked[node] = clock.run(node, site.masked_input, values[node])
    up += len(masked) * size * WORD
    sent, dropped = sorted(masked), [node for node in nodes if node not in masked]
    answers = {node: clock.run(node, sites[node].unmask, sent, dropped) for node in sent}
    down += len(sent) * NODE_ID * n
    up += sum((NODE_ID + 32) * (len(a.seeds) + len(a.mask_keys)) for a in answers.values())
    total = clock.run("server", sp.unmask_sum, roster, masked, answers).view(np.int64)
    assert np.array_equal(total, sum(values[node] for node in sent))
    return {"site_s": statistics.mean(clock.seconds[k] for k in nodes), "server_s": clock.seconds["server"],
            "bytes_up": up, "bytes_down": down, "threshold": threshold}


def median_case(fn, repeats: int, *args) -> dict:
    runs = [fn(*args) for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["runs"] = repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/secure_aggregation.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    rng = np.random.default_rng(0)
    results = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
               "python": platform.python_version(), "cpus": os.cpu_count(), "load_at_start": load,
               "sites": args.sites, "threshold": sp.default_threshold(args.sites), "cases": {}}
    nodes = list(range(1, args.sites + 1))
    print(f"{args.sites} sites, threshold {results['threshold']}, load {load[0]:.1f}; medians of {args.repeats}")
    print(f"{'vector':18} {'protocol':22} {'site s':>8} {'server s':>9} {'kB up':>9} {'kB down':>9} "
          f"{'time ×pairwise':>14} {'bytes ×plain':>12}")
    for name, size in SIZES.items():
        values = {n: rng.integers(-2 ** 40, 2 ** 40, size=size) for n in nodes}
        cases = {"plain sum": median_case(plain, args.repeats, values),
                 "pairwise masks": median_case(pairwise, args.repeats, values)}
        for lost in (0, 1, 2):
            cases[f"recovering, {lost} lost"] = median_case(recovering, args.repeats, values, nodes[:lost])
        base, masks = cases["plain sum"], cases["pairwise masks"]
        base_time = masks["server_s"] + masks["site_s"]
        for case, row in cases.items():
            row["time_ratio"] = (row["site_s"] + row["server_s"]) / base_time
            row["bytes_ratio"] = (row["bytes_up"] + row["bytes_down"]) / (base["bytes_up"] + base["bytes_down"])
            print(f"{name:18} {case:22} {row['site_s']:8.4f} {row['server_s']:9.4f} {row['bytes_up'] / 1e3:9.1f} "
                  f"{row['bytes_down'] / 1e3:9.1f} {row['time_ratio']:14.2f} {row['bytes_ratio']:12.3f}")
        results["cases"][name] = cases
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
