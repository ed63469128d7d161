"""The ground-truth world (patients, nanoparticle PK/PD, clinics, oracle) and the experiment runner."""
