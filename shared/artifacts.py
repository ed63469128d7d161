"""The models a run leaves behind, written and read only here, keyed by the run that made them.

A federated run's output folder holds the federated encoder (``encoder.json``), the final ANN weights
(``ann_federated.pt``), one XGBoost model per head (``xgb_<head>.json``) and ``artifacts.json``: the run id,
which of those files the run wrote, and the ANN's hidden widths. :meth:`RunArtifacts.start` begins a new
manifest for a run (a reused folder's older files are no longer listed), so whoever reads through this module
— the policy builder that signs them into a bundle, the experiment runner, the liposome paper's folds — gets
this run's models only, never a file an earlier run left behind. A signed policy bundle carries the same
files; :func:`load_ann` and :func:`load_booster` read them there too.

Example
-------
>>> artifacts = RunArtifacts.start(Path("runs/federation"), run_id="17")     # doctest: +SKIP
>>> artifacts.save_encoder(encoder); artifacts.save_ann(state_dict, (64, 32))  # doctest: +SKIP
>>> RunArtifacts.open(Path("runs/federation"), run_id="17").predict_ann(frame)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.boosting import heads, predict_heads
from shared.durable import write_json_atomically
from shared.encoding import FeatureEncoder

ARTIFACTS_FILE = "artifacts.json"
ENCODER_FILE = "encoder.json"
ANN_FILE = "ann_federated.pt"
FORMAT = "fednano/run-artifacts"
FORMAT_VERSION = 1


class ArtifactsError(ValueError):
    """The folder holds no models of the run asked for (or none at all)."""


def booster_file(head_key: str) -> str:
    return f"xgb_{head_key}.json"


def load_ann(path: Path, encoder: FeatureEncoder, hidden: tuple[int, ...]):
    """The ANN of ``hidden`` widths for ``encoder``'s features with the weights saved at ``path``, in eval mode."""
    import torch

    from shared.ann import build_model

    model = build_model(encoder, encoder.task, tuple(hidden), seed=0)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    return model


def load_booster(path: Path, threads: int | None = None):
    """The XGBoost model saved at ``path`` (``threads``: its ``nthread``; one suits per-patient predictions)."""
    import xgboost as xgb

    params = {"nthread": threads} if threads is not None else {}
    return xgb.Booster(params=params, model_file=str(path))


@dataclass
class RunArtifacts:
    """One run's model files in ``folder`` (see the module docstring)."""

    folder: Path
    run_id: str
    files: dict[str, str] = field(default_factory=dict)  # role ("encoder", "ann", "xgb:<head>") -> file name
    hidden: tuple[int, ...] = ()

    @classmethod
    def start(cls, folder: Path, run_id: str) -> RunArtifacts:
        """A new manifest for ``run_id`` in ``folder``; the model files an earlier run's manifest lists there are
        removed, so none can be taken for this run's."""
        folder = Path(folder)
        try:
            earlier = cls.open(folder)
        except ArtifactsError:
            earlier = None
        if earlier is not None:
            for name in earlier.files.values():
                (folder / name).unlink(missing_ok=True)
        artifacts = cls(folder, str(run_id))
        artifacts.folder.mkdir(parents=True, exist_ok=True)
        artifacts._write()
        return artifacts

    @classmethod
    def open(cls, folder: Path, run_id: str | None = None) -> RunArtifacts:
        """The manifest in ``folder``; with ``run_id``, :class:`ArtifactsError` unless it is that run's."""
        path = Path(folder) / ARTIFACTS_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactsError(f"{path}: no readable model manifest of a run ({err})") from err
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ArtifactsError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
        artifacts = cls(Path(folder), str(data["run_id"]), dict(data["files"]), tuple(data.get("hidden", ())))
        if run_id is not None and artifacts.run_id != str(run_id):
            raise ArtifactsError(f"{path}: the models there are run {artifacts.run_id}'s, not run {run_id}'s")
        return artifacts

    def _write(self) -> None:
        write_json_atomically(self.folder / ARTIFACTS_FILE, {"format": FORMAT, "version": FORMAT_VERSION,
                                                             "run_id": self.run_id, "files": self.files,
                                                             "hidden": list(self.hidden)})

    # -- writing -------------------------------------------------------------------------------------------

    def save_encoder(self, encoder: FeatureEncoder) -> None:
        (self.folder / ENCODER_FILE).write_text(json.dumps(encoder.to_dict(), indent=1) + "\n")
        self.files["encoder"] = ENCODER_FILE
        self._write()

    def save_ann(self, state_dict: dict, hidden: tuple[int, ...]) -> None:
        import torch

        torch.save(state_dict, self.folder / ANN_FILE)
        self.files["ann"], self.hidden = ANN_FILE, tuple(hidden)
        self._write()

    def save_boosters(self, models: dict[str, bytes]) -> None:
        for key, model in models.items():
            (self.folder / booster_file(key)).write_bytes(model)
            self.files[f"xgb:{key}"] = booster_file(key)
        self._write()

    # -- reading -------------------------------------------------------------------------------------------

    def path(self, role: str) -> Path:
        if role not in self.files:
            raise ArtifactsError(f"{self.folder}: run {self.run_id} left no {role} model")
        return self.folder / self.files[role]

    @property
    def has_ann(self) -> bool:
        return "ann" in self.files

    @property
    def booster_keys(self) -> list[str]:
        return sorted(role.removeprefix("xgb:") for role in self.files if role.startswith("xgb:"))

    def encoder(self) -> FeatureEncoder:
        return FeatureEncoder.from_dict(json.loads(self.path("encoder").read_text()))

    def ann(self):
        return load_ann(self.path("ann"), self.encoder(), self.hidden)

    def boosters(self) -> dict[str, bytes]:
        return {key: self.path(f"xgb:{key}").read_bytes() for key in self.booster_keys}

    def model_files(self) -> dict[str, Path]:
        """Every file of this run by name (what a policy bundle carries)."""
        return {name: self.folder / name for name in self.files.values()}

    def predict_ann(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The ANN's predictions for the rows of ``frame``, regression outcomes on their original scale."""
        from shared.ann import predict

        encoder = self.encoder()
        return _decoded(encoder, predict(self.ann(), encoder.transform(frame)))

    def predict_xgboost(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The boosters' predictions for the rows of ``frame``, regression outcomes on their original scale."""
        encoder = self.encoder()
        models = self.boosters()
        missing = [h.key for h in heads(encoder) if h.key not in models]
        if missing:
            raise ArtifactsError(f"{self.folder}: run {self.run_id} has no booster for {', '.join(missing)}")
        return _decoded(encoder, predict_heads(models, encoder, encoder.transform(frame)))


def _decoded(encoder: FeatureEncoder, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {o.name: (encoder.decode_regression(o.name, predictions[o.name]) if o.kind == "regression"
                     else predictions[o.name]) for o in encoder.task.outcomes}
