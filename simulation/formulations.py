"""Nanoparticle formulations: the physical properties a carrier brings and the catalogues clinics hold.

Default marginals follow the seed paper's Table 1 (particle size 120 ± 15 nm, surface charge 25 ± 5 mV,
encapsulation efficiency 85 ± 8 %, release time 12 ± 3 h). Release shape β follows the real liposome
fits in ``simulation/data/liposome_ivr`` (see :mod:`simulation.release`). The library a world draws from
spans wider than the seed's marginals and includes two marketed reference products, so that the choice of
formulation matters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from simulation.release import sample_beta

# Seed paper, Table 1: mean ± sd of the formulation properties.
SEED_SIZE_NM = (120.0, 15.0)
SEED_ZETA_MV = (25.0, 5.0)
SEED_EE_PCT = (85.0, 8.0)
SEED_RELEASE_H = (12.0, 3.0)


@dataclass
class Formulations:
    """Arrays of formulation properties, one entry per formulation."""

    formulation_id: np.ndarray
    particle_size_nm: np.ndarray
    zeta_mv: np.ndarray
    encapsulation_pct: np.ndarray
    pegylated: np.ndarray
    drug_loading_pct: np.ndarray
    release_tau_h: np.ndarray
    release_beta: np.ndarray

    def __len__(self) -> int:
        return len(self.particle_size_nm)

    def take(self, index: np.ndarray) -> Formulations:
        return Formulations(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list[Formulations]) -> Formulations:
        return Formulations(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                               for f in fields(Formulations)})


def reference_products() -> Formulations:
    """Two marketed liposomal doxorubicins as anchors of the catalogue.

    - ``PLD``: PEGylated liposomal doxorubicin (Doxil/Caelyx): ~85 nm, slightly negative, >90 % encapsulated,
      drug-to-lipid ~1:8 w/w, very slow release in circulation (Gabizon et al., Cancer Res 1994;54:987;
      Barenholz, J Control Release 2012;160:117).
    - ``NPLD``: non-PEGylated liposomal doxorubicin (Myocet): ~180 nm, near-neutral, ~98 % encapsulated,
      faster release (Myocet SmPC; Batist et al., Clin Cancer Res 2002;8:1137 reviewed in Swenson 2003).
    """
    return Formulations(
        formulation_id=np.array(["PLD", "NPLD"]),
        particle_size_nm=np.array([85.0, 180.0]),
        zeta_mv=np.array([-10.0, -5.0]),
        encapsulation_pct=np.array([95.0, 98.0]),
        pegylated=np.array([True, False]),
        drug_loading_pct=np.array([12.5, 25.0]),
        release_tau_h=np.array([600.0, 3.0]),
        release_beta=np.array([0.67, 0.8]),
    )


def sample_formulations(rng: np.random.Generator, n: int, prefix: str = "NP") -> Formulations:
    """``n`` formulations with the seed paper's Table 1 marginals (normal, clipped to physical bounds)."""
    return Formulations(
        formulation_id=np.array([f"{prefix}{i:02d}" for i in range(n)]),
        particle_size_nm=np.clip(rng.normal(*SEED_SIZE_NM, n), 20, 400),
        zeta_mv=np.clip(rng.normal(*SEED_ZETA_MV, n), -60, 60),
        encapsulation_pct=np.clip(rng.normal(*SEED_EE_PCT, n), 30, 99.5),
        pegylated=rng.random(n) < 0.5,
        drug_loading_pct=rng.uniform(5, 20, n),
        release_tau_h=np.clip(rng.normal(*SEED_RELEASE_H, n), 1, None),
        release_beta=sample_beta(rng, n),
    )


def sample_wide_formulations(rng: np.random.Generator, n: int, prefix: str = "NW") -> Formulations:
    """``n`` formulations spanning wider than the seed's marginals: sizes 20-350 nm (log-uniform),
    anionic to cationic surfaces, leaky to tight encapsulation, release from hours to weeks."""
    return Formulations(
        formulation_id=np.array([f"{prefix}{i:02d}" for i in range(n)]),
        particle_size_nm=np.exp(rng.uniform(np.log(20), np.log(350), n)),
        zeta_mv=rng.uniform(-40, 40, n),
        encapsulation_pct=rng.uniform(50, 99, n),
        pegylated=rng.random(n) < 0.6,
        drug_loading_pct=rng.uniform(3, 30, n),
        release_tau_h=np.exp(rng.uniform(np.log(2), np.log(1500), n)),
        release_beta=sample_beta(rng, n),
    )


def formulation_library(rng: np.random.Generator, n_seed: int = 6, n_wide: int = 6) -> Formulations:
    """The world's library: the two reference products, seed-like and wider formulations."""
    return Formulations.concat([reference_products(), sample_formulations(rng, n_seed),
                                sample_wide_formulations(rng, n_wide)])
