"""Writes small valid site folders and task CSVs for tests, and edits single cells of them.

``write_site`` builds 6 patients × 2 cycles with plausible values that pass every check of
``shared.validation`` (BSA by Mosteller, dose_mg = dose_mg_m2 × bsa_m2), vitals for days 0-2 of each cycle
and a site.toml. Rows are patient-major: data row 1 is P01 cycle 1, row 2 P01 cycle 2, row 3 P02 cycle 1, ...
Tests corrupt one thing each with ``set_cell`` / ``write_rows``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

from shared.schema import EPISODE_COLUMNS, EPISODES_FILE, SITE_FILE, VITALS_COLUMNS, VITALS_FILE

SITE_TOML = """\
[site]
name = "alpha"
schema_version = "1.0"

[privacy]
dp = true
epsilon = 3.0
delta = 1e-5
"""

TUMOURS = ("ovarian", "breast", "kaposi", "myeloma", "sarcoma", "ovarian")
FORMULATIONS = {
    # id: particle_size_nm, zeta_mv, encapsulation_pct, pegylated, drug_loading_pct, release_tau_h,
    # release_beta
    "LIPO-PEG": (85.0, -12.0, 95.0, 1, 12.5, 48.0, 0.8),
    "LIPO-CONV": (140.0, -25.0, 90.0, 0, 8.0, 6.0, 1.1),
}


def episode_rows(n_patients: int = 6, n_cycles: int = 2) -> list[dict[str, str]]:
    """Plausible, mutually consistent episode rows (all values as CSV text)."""
    rows = []
    for p in range(n_patients):
        weight, height = 60.0 + 4 * p, 160.0 + 3 * p
        bsa = round(math.sqrt(height * weight / 3600.0), 2)
        formulation = list(FORMULATIONS)[p % len(FORMULATIONS)]
        size, zeta, encapsulation, peg, loading, tau, beta = FORMULATIONS[formulation]
        dose_m2 = 40.0 if p % 2 == 0 else 50.0
        for c in range(n_cycles):
            efficacy = 10.0 + 7 * p - 3 * c
            rows.append({
                "episode_id": f"E{p * n_cycles + c + 1:02d}", "patient_id": f"P{p + 1:02d}",
                "cycle": str(c + 1), "start_day": str(28 * c),
                "age_years": f"{45 + 5 * p + c * 0.1:.1f}", "sex": "FM"[p % 2],
                "weight_kg": f"{weight:g}", "height_cm": f"{height:g}", "bsa_m2": f"{bsa:.2f}",
                "bilirubin_umol_l": "" if p == 5 else "8.5", "creatinine_clearance_ml_min": "92",
                "anc_baseline_e9_l": "4.2", "ecog": str(p % 2), "tumour_type": TUMOURS[p % len(TUMOURS)],
                "tumour_burden_mm": f"{40 + 5 * p:g}", "cumulative_dose_mg_m2": f"{dose_m2 * c:g}",
                "formulation_id": formulation, "particle_size_nm": f"{size:g}", "zeta_mv": f"{zeta:g}",
                "encapsulation_pct": f"{encapsulation:g}", "pegylated": str(peg),
                "drug_loading_pct": f"{loading:g}", "release_tau_h": f"{tau:g}", "release_beta": f"{beta:g}",
                "dose_mg_m2": f"{dose_m2:g}", "dose_mg": f"{dose_m2 * bsa:.1f}", "interval_days": "28",
                "efficacy_pct": f"{efficacy:g}", "response": str(int(efficacy >= 30)),
                "anc_nadir_e9_l": "1.6", "toxicity_grade3": str(int(p == 3)), "chf": "0",
            })
    return rows


def vitals_rows(episodes: list[dict[str, str]], n_days: int = 3) -> list[dict[str, str]]:
    """Wearable readings for days 0 .. n_days-1 of every episode."""
    return [
        {"patient_id": e["patient_id"], "episode_id": e["episode_id"], "day": str(day),
         "temperature_c": f"{36.6 + 0.1 * day:.1f}", "heart_rate_bpm": "72", "spo2_pct": "97",
         "steps": str(4000 + 500 * day)}
        for e in episodes for day in range(n_days)
    ]


def write_site(root: Path, name: str = "alpha") -> Path:
    """Write a valid site folder ``root/name`` (episodes, vitals, site.toml) and return its path."""
    folder = root / name
    folder.mkdir(parents=True)
    episodes = episode_rows()
    write_dicts(folder / EPISODES_FILE, [c.name for c in EPISODE_COLUMNS], episodes)
    write_dicts(folder / VITALS_FILE, [c.name for c in VITALS_COLUMNS], vitals_rows(episodes))
    (folder / SITE_FILE).write_text(SITE_TOML, encoding="utf-8")
    return folder


def write_dicts(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    write_rows(path, [header] + [[row[h] for h in header] for row in rows])


def write_rows(path: Path, rows: list[list[str]]) -> None:
    """Write rows (header first) as UTF-8 CSV with \\n line ends."""
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def read_rows(path: Path) -> list[list[str]]:
    """All rows of a CSV file, header first."""
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    """Replace the cell of 1-based data row ``row`` in ``column``."""
    rows = read_rows(path)
    rows[row][rows[0].index(column)] = value
    write_rows(path, rows)


def drop_column(path: Path, column: str) -> None:
    rows = read_rows(path)
    i = rows[0].index(column)
    write_rows(path, [r[:i] + r[i + 1:] for r in rows])


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (or of ``folder`` itself when it is a file)."""
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


TASK_TOML = """\
[task]
kind = "binary"
target = "target"
split = "split"

[features]
numeric = ["age", "chol"]
categorical = ["sex", "cp"]

[ranges]
age = [0, 120]
"""


def write_task_csv(path: Path, n_rows: int = 20) -> Path:
    """A heart-disease-like table matching ``TASK_TOML``: age, chol, sex, cp, an extra-free header."""
    splits = ["train"] * (n_rows - 4) + ["val", "val", "test", "test"]
    rows = [["age", "chol", "sex", "cp", "target", "split"]]
    for i in range(n_rows):
        rows.append([str(40 + i), "" if i == 3 else str(200 + 3 * i), "FM"[i % 2], f"type{i % 4}",
                     str(i % 2), splits[i]])
    write_rows(path, rows)
    return path


def write_task_toml(path: Path, text: str = TASK_TOML) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def provisioned_clinics(tmp_path: Path, patients_per_clinic: int, clinics: int = 2, seed: int = 3):
    """Simulated clinics' site folders with a provisioned kit: the world and, per clinic, (site folder, the
    coordinator's trust key in that site's kit) — what the closed loop's tests treat patients at."""
    from server.provision import provision
    from simulation.clinics import generate_sites

    world = generate_sites(clinics, seed=seed, out=tmp_path / "sites", patients_per_clinic=patients_per_clinic)
    names = [c.name for c in world.clinics]
    provision("loop", names, tmp_path / "kit")
    return world, {n: (tmp_path / "sites" / n, tmp_path / "kit" / "sites" / n / "policy_signing.pub") for n in names}
