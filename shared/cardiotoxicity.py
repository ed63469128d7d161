"""Anthracycline heart failure against cumulative dose: a public curve both the simulator and the policy use.

P(CHF) after a cumulative doxorubicin(-equivalent) dose D (mg/m²) is the Weibull curve
``1 − exp(−(D / 748)^4.6)``, fitted to Swain, Whaley & Ewer, "Congestive heart failure in patients treated with
doxorubicin", Cancer 2003;97:2869 (5 % at 400, 26 % at 550, 48 % at 700 mg/m²). The risk of a cycle given no
heart failure before it is the conditional increment of that curve.
"""

from __future__ import annotations

import numpy as np

CHF_SCALE_MG_M2 = 748.0
CHF_SHAPE = 4.6


def chf_cumulative_probability(cumulative_dose_mg_m2):
    """P(CHF) after a cumulative doxorubicin(-equivalent) dose: 1 − exp(−(D/748)^4.6) (fit to Swain 2003)."""
    return 1.0 - np.exp(-((np.asarray(cumulative_dose_mg_m2) / CHF_SCALE_MG_M2) ** CHF_SHAPE))


def chf_cycle_probability(cumulative_before_mg_m2, cardiac_dose_mg_m2):
    """P(CHF during this cycle | none before): the conditional increment of the cumulative curve."""
    before = chf_cumulative_probability(cumulative_before_mg_m2)
    after = chf_cumulative_probability(np.asarray(cumulative_before_mg_m2) + np.asarray(cardiac_dose_mg_m2))
    return (after - before) / np.maximum(1.0 - before, 1e-12)
