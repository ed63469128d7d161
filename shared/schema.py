"""The site-data contract: every column a site file may hold, with dtype, unit, allowed range and nullability.

A site is a folder holding ``episodes.csv`` (one row per treatment cycle), optionally ``vitals.csv``
(wearable readings, one row per patient per day of a cycle), optionally ``decisions.csv`` (the telemedicine
service's log of what it could have recommended and with which probability, one row per option of a
decision) and optionally ``site.toml``.
Both the hospital client and the simulator import these declarations; README's data-contract table is
generated from them (``python -m shared.schema``), so the two never drift apart.

Ranges are physiological or physical limits, not typical values: they catch unit mistakes (a particle
size of 0.12 is micrometres, not nanometres) and corrupt values, and let every plausible patient through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = "1.0"

EPISODES_FILE = "episodes.csv"
VITALS_FILE = "vitals.csv"
DECISIONS_FILE = "decisions.csv"
SITE_FILE = "site.toml"


@dataclass(frozen=True)
class Column:
    """One declared column of a site file.

    Parameters
    ----------
    name : str
        Header name in the CSV file.
    dtype : {"str", "int", "float", "bool", "category"}
        ``bool`` columns hold 0 or 1; ``category`` columns hold one of ``categories``.
    unit : str
        Physical unit, or ``"-"`` for unitless values and identifiers.
    description : str
        What the column means, for README and error messages.
    low, high : float or None
        Inclusive allowed range for numeric columns.
    nullable : bool
        Whether an empty cell is allowed (a missing measurement).
    categories : tuple of str
        Allowed values of a ``category`` column.
    hint_below, hint_above : str
        Added to the message for values below / above the range, when a common unit mistake would produce
        such values (micrometres for nanometres, °F for °C, ...).
    """

    name: str
    dtype: str
    unit: str
    description: str
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    categories: tuple[str, ...] = field(default_factory=tuple)
    hint_below: str = ""
    hint_above: str = ""

    @property
    def is_numeric(self) -> bool:
        return self.dtype in ("int", "float", "bool")

    def expectation(self) -> str:
        """A short phrase saying what a valid value looks like, for error messages."""
        if self.dtype == "category":
            return "one of " + ", ".join(self.categories)
        if self.dtype == "bool":
            return "0 or 1"
        if self.dtype == "str":
            return "a non-empty text identifier"
        kind = "an integer" if self.dtype == "int" else "a number"
        unit = "" if self.unit == "-" else f" {self.unit}"
        if self.low is not None and self.high is not None:
            return f"{kind} in [{self.low:g}, {self.high:g}]{unit}"
        return f"{kind}{unit}"


TUMOUR_TYPES = ("ovarian", "breast", "kaposi", "myeloma", "sarcoma")
SEXES = ("F", "M")

EPISODE_COLUMNS: tuple[Column, ...] = (
    # identity and time
    Column("episode_id", "str", "-", "Unique id of this treatment cycle at the site"),
    Column("patient_id", "str", "-", "Pseudonymous patient id, stable across cycles"),
    Column("cycle", "int", "-", "Treatment cycle number, 1 for the first", 1, 30),
    Column("start_day", "int", "day", "Day the cycle started, counted from the patient's first cycle",
           0, 1000),
    # patient covariates at the start of the cycle
    Column("age_years", "float", "year", "Age at the start of the cycle", 18, 110),
    Column("sex", "category", "-", "Sex recorded at birth", categories=SEXES),
    Column("weight_kg", "float", "kg", "Body weight", 25, 250,
           hint_above="values above 250 may be pounds; give kilograms"),
    Column("height_cm", "float", "cm", "Body height", 100, 230,
           hint_below="a height of 1.2-2.3 looks like metres; give centimetres"),
    Column("bsa_m2", "float", "m²", "Body-surface area (Mosteller)", 0.8, 3.2),
    Column("bilirubin_umol_l", "float", "µmol/L", "Total serum bilirubin", 1, 600, nullable=True,
           hint_below="values below 1 look like mg/dL; multiply by 17.1 for µmol/L"),
    Column("creatinine_clearance_ml_min", "float", "mL/min", "Creatinine clearance (Cockcroft-Gault)",
           5, 300, nullable=True),
    Column("anc_baseline_e9_l", "float", "10⁹/L", "Absolute neutrophil count before the cycle", 0, 50,
           nullable=True, hint_above="values in cells/µL (e.g. 4000) are 1000x too large; give 10⁹/L"),
    Column("ecog", "int", "-", "ECOG performance status", 0, 4),
    Column("tumour_type", "category", "-", "Tumour type (EPR permeability differs)", categories=TUMOUR_TYPES),
    Column("tumour_burden_mm", "float", "mm", "Sum of longest diameters of target lesions (RECIST)",
           5, 500, nullable=True, hint_below="values below 5 look like centimetres; give millimetres"),
    Column("cumulative_dose_mg_m2", "float", "mg/m²",
           "Cumulative anthracycline dose (doxorubicin-equivalent) before this cycle", 0, 1500),
    # nanoparticle formulation
    Column("formulation_id", "str", "-", "Id of the formulation in the site's catalogue"),
    Column("particle_size_nm", "float", "nm", "Hydrodynamic diameter (Z-average)", 1, 1000,
           hint_below="values below 1 look like micrometres; multiply by 1000 for nm"),
    Column("zeta_mv", "float", "mV", "Zeta potential (surface charge)", -100, 100,
           hint_below="zeta beyond ±100 mV is not physical for these carriers; check the unit (mV)",
           hint_above="zeta beyond ±100 mV is not physical for these carriers; check the unit (mV)"),
    Column("encapsulation_pct", "float", "%", "Encapsulation efficiency", 0, 100,
           hint_above="a percentage cannot exceed 100"),
    Column("pegylated", "bool", "-", "Whether the carrier surface is PEGylated"),
    Column("drug_loading_pct", "float", "%", "Drug loading: drug mass per carrier mass (w/w)", 0, 100),
    Column("release_tau_h", "float", "h", "Weibull release scale: time to 63 % release in vitro", 0.01, 5000),
    Column("release_beta", "float", "-", "Weibull release shape", 0.05, 5),
    # what was given
    Column("dose_mg_m2", "float", "mg/m²", "Dose per body-surface area", 0, 150),
    Column("dose_mg", "float", "mg", "Absolute dose given", 0, 500),
    Column("interval_days", "int", "day", "Days until the next planned cycle", 7, 42),
    # outcomes of the cycle
    Column("efficacy_pct", "float", "%", "Tumour shrinkage from the cycle's baseline (negative = growth)",
           -300, 100, nullable=True),
    Column("response", "bool", "-", "Shrinkage of at least 30 % (RECIST partial response or better)",
           nullable=True),
    Column("anc_nadir_e9_l", "float", "10⁹/L", "Lowest neutrophil count during the cycle", 0, 50,
           nullable=True),
    Column("toxicity_grade3", "bool", "-",
           "Any grade >= 3 toxicity (neutropenia, hand-foot syndrome, infusion reaction)", nullable=True),
    Column("chf", "bool", "-", "Congestive heart failure diagnosed during the cycle", nullable=True),
)

VITALS_COLUMNS: tuple[Column, ...] = (
    Column("patient_id", "str", "-", "Patient id, as in episodes.csv"),
    Column("episode_id", "str", "-", "Cycle the reading belongs to, as in episodes.csv"),
    Column("day", "int", "day", "Day within the cycle, 0 = day of infusion", 0, 42),
    Column("temperature_c", "float", "°C", "Daily maximum skin/core temperature", 33, 43, nullable=True,
           hint_above="values near 90-110 look like °F; give °C"),
    Column("heart_rate_bpm", "float", "1/min", "Daily mean resting heart rate", 25, 230, nullable=True),
    Column("spo2_pct", "float", "%", "Daily mean oxygen saturation", 50, 100, nullable=True,
           hint_below="a fraction (0-1) looks like SpO2/100; give percent"),
    Column("steps", "int", "step/day", "Daily step count", 0, 60000, nullable=True),
)

DECISION_COLUMNS: tuple[Column, ...] = (
    Column("patient_id", "str", "-", "Patient id, as in episodes.csv"),
    Column("cycle", "int", "-", "Cycle the decision was for (with patient_id, the decision's key)", 1, 30),
    Column("policy_version", "int", "-", "Policy version served (empty: standard of care)", 1, 1_000_000,
           nullable=True),
    Column("formulation_id", "str", "-", "Formulation of this option"),
    Column("dose_mg_m2", "float", "mg/m²", "Dose per body-surface area of this option", 0, 150),
    Column("interval_days", "int", "day", "Interval of this option", 7, 42),
    Column("probability", "float", "-", "Probability the service recommended this option; a decision's "
           "options sum to 1", 0, 1),
    Column("chosen", "bool", "-", "1 for the option the draw recommended (one per decision)"),
)
"""``decisions.csv``: each first-cycle (or later) recommendation with every option it could have made and its
probability (``shared.exploration``), so the site's off-policy estimate uses the exact probability of what was
given (``client.ope``) instead of a model of its habits."""

OUTCOMES = ("response", "toxicity_grade3", "efficacy_pct")
"""Outcomes the built-in nanoparticle task learns (two binary, one regression)."""


def columns_by_name(columns: tuple[Column, ...]) -> dict[str, Column]:
    return {c.name: c for c in columns}


def markdown_table(columns: tuple[Column, ...]) -> str:
    """The README table for a set of columns."""
    rows = ["| column | dtype | unit | allowed | may be missing | meaning |", "|---|---|---|---|---|---|"]
    for c in columns:
        if c.dtype == "category":
            allowed = ", ".join(c.categories)
        elif c.dtype == "bool":
            allowed = "0, 1"
        elif c.low is not None:
            allowed = f"{c.low:g} – {c.high:g}"
        else:
            allowed = "text"
        rows.append(f"| `{c.name}` | {c.dtype} | {c.unit} | {allowed} | {'yes' if c.nullable else 'no'} "
                    f"| {c.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"### `{EPISODES_FILE}`\n\n{markdown_table(EPISODE_COLUMNS)}\n")
    print(f"### `{VITALS_FILE}`\n\n{markdown_table(VITALS_COLUMNS)}\n")
    print(f"### `{DECISIONS_FILE}`\n\n{markdown_table(DECISION_COLUMNS)}")
