"""No patient value or identifier reaches the coordinator, in any file it writes or on its console.

A site whose episodes hold an impossible age (131.7 years) and whose vitals name a patient absent from its
episodes ('MRN-0047113') is rejected at the site check; what the run record, results.json, report.md and the
console say names the file, column, row and rule, never the value or the identifier (the full text stays in
the site's own log and ``fednano validate`` run at the site)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from contextlib import redirect_stdout

import pytest

from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

pytestmark = pytest.mark.slow
PLANTED = ("131.7", "MRN-0047113")


def plant(folder) -> None:
    """Age 131.7 on the first episode; a vitals row of a patient the episodes do not know."""
    episodes = folder / "episodes.csv"
    rows = list(csv.DictReader(episodes.open()))
    rows[0]["age_years"] = "131.7"
    with episodes.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    vitals = folder / "vitals.csv"
    lines = vitals.read_text().splitlines()
    first = next(csv.DictReader(io.StringIO("\n".join(lines[:2]))))
    first["patient_id"] = "MRN-0047113"
    lines.append(",".join(first[column] for column in lines[0].split(",")))
    vitals.write_text("\n".join(lines) + "\n")


def test_a_bad_sites_values_stay_at_the_site(tmp_path, shared_ray):
    flower_environment(tmp_path)
    quiet_flower()
    generate_sites(3, seed=4, out=tmp_path / "sites", patients_per_clinic=40, privacy=SitePrivacy(dp=False))
    plant(tmp_path / "sites" / "clinic_02")
    out = tmp_path / "out"
    sites = [tmp_path / "sites" / f"clinic_{i:02d}" for i in range(3)]
    cfg = ExperimentConfig(out=out, sites=sites, rounds=1, models="ann", compare=False, fqi_iterations=0)
    console = io.StringIO()
    with redirect_stdout(console):
        results = run_experiment(cfg)
    problems = results["rejected"]["clinic_02"]
    assert any("episodes.csv" in p and "age_years" in p for p in problems), problems
    written = [out / "results.json", out / "report.md", out / "federated" / "federation.json"]
    texts = [path.read_text() for path in written] + [console.getvalue(), json.dumps(results)]
    for value in PLANTED:
        for where, text in zip([*map(str, written), "console", "results"], texts, strict=True):
            assert value not in text, (value, where)
    shutil.rmtree(out)
