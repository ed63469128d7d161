"""Body-surface area: the one formula every part of fednano doses by, and how far a recorded BSA may stray.

Mosteller, "Simplified calculation of body-surface area", N Engl J Med 1987;317:1098:
``BSA [m²] = sqrt(height [cm] · weight [kg] / 3600)``. The site-data check warns, and the recommender refuses,
a recorded ``bsa_m2`` further than ``BSA_TOLERANCE`` from it: other BSA formulas (DuBois, Haycock) differ from
Mosteller's by a few per cent in adults, a wrong field by far more.
"""

from __future__ import annotations

import numpy as np

BSA_TOLERANCE = 0.10
"""Allowed relative gap between a recorded bsa_m2 and Mosteller's (other BSA formulas differ by a few %)."""


def mosteller_bsa_m2(height_cm, weight_kg):
    """Body-surface area in m² from height in cm and weight in kg (scalars, arrays or pandas Series)."""
    return np.sqrt(height_cm * weight_kg / 3600.0)
