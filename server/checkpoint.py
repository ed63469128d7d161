"""The coordinator's checkpoint: what a crashed run needs to continue from its last completed round or phase.

NVIDIA FLARE and Fed-BioMed checkpoint a federation's server state and resume it; this is fednano's, for the
phases of :func:`server.app.run_federation`. After the site check, after the statistics, after every ANN
training round and after the ANN family is complete, ``OUT/checkpoint/`` is replaced atomically
(:func:`shared.durable.write_json_atomically`; the arrays go first to a new ``.npz`` file that the JSON then
names, so a reader sees one whole checkpoint or the previous one). It holds:

- the ORIGINAL run id (a resumed run presents it to the sites, whose ledgers then charge a round asked again
  once: ``client.run_state``, ``client.ledger``), the run's settings (a resume must ask the same),
- the stage reached (:data:`STAGES`) and the training rounds completed,
- the run record so far and the encoder,
- the global ANN arrays and the strategy's state: FedAdam's / FedYogi's moments (``m_t``, ``v_t``, kept on
  Flower's strategy instance), update-norm clipping's norms and bounds, central DP's rounds released, adaptive
  bound and noise generator (:meth:`strategies.central_dp.CentralDP.state`), and :class:`strategies.per_site.
  PerSiteRecord`'s per-site replies, by site name (node ids change when a run restarts).

Each training round's per-site replies are written once, not with every checkpoint: a round two or more
behind the checkpoint's is settled (no later round adds to it; a one-message round records the previous round's
evaluation) and goes to ``OUT/checkpoint/rounds-<run id>/round-<r>.json``, which the state file lists; only the
last round travels in the state file. Those files are one line of JSON with long numeric lists (the evaluation
summaries' score histograms, mostly empty bins) kept as their non-zero entries: at 1,000 clinics a round's
evaluations were 25 MB as indented lists. Rewriting every round's tables each round cost the coordinator
65 of 116 s of training at 200 clinics (py-spy, 2026-12-04), while the sites waited for the round to close.

Phases after the ANN (boosting, importance of XGBoost, personalisation, policy) restart from their beginning
when the run stopped inside them: each is one checkpointed unit, and a DP site charges a release it is asked
again with the same values once (``client.dp.PhaseRelease.release``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared.durable import fsync_folder, write_json_atomically
from strategies.central_dp import CentralDP
from strategies.per_site import PerSiteRecord, SiteRounds
from strategies.update_clipping import UpdateNormClipping

CHECKPOINT_FOLDER = "checkpoint"
STATE_FILE = "checkpoint.json"
FORMAT = "fednano/checkpoint"
VERSION = 1
STAGES = ("started", "statistics", "training", "ann")
"""What a checkpoint has completed: the site check; the statistics (encoder); some training rounds
(``server_round`` of them); the whole ANN family (final weights, record, importance)."""
OPTIMISER_STATE = ("m_t", "v_t")
"""Attributes of Flower's FedOpt strategies (FedAdam, FedYogi, FedAdagrad) that carry their moments across rounds."""
SETTLED_LAG = 1
"""Rounds ``r <= server_round - SETTLED_LAG`` are settled: their per-site tables no longer change. A one-message
round's training replies carry the evaluation of the round before (:class:`strategies.per_site.PerSiteRecord`),
so when round ``k`` is checkpointed round ``k - 1`` is complete, and round ``k`` waits for round ``k + 1``."""
PER_SITE = "per_site"
NOT_RESUMED = ("resume",)
"""Settings a resumed run may change (the rest must be the checkpointed run's)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (unreadable, another format, other settings); says why."""


@dataclass
class Checkpoint:
    """One checkpoint (module docstring).

    Parameters
    ----------
    run_id : str
        The original run's id.
    settings : dict
        The run's settings as run-config keys (``server.settings.RunSettings.to_run_config``).
    stage : str
        One of :data:`STAGES`.
    record : dict
        The run record so far (``server.run_record.RunRecord.to_dict``).
    encoder : dict or None
        The federated encoder (``shared.encoding.FeatureEncoder.to_dict``), from stage ``statistics`` on.
    server_round : int
        ANN training rounds completed.
    arrays : dict of str to ndarray
        The global ANN arrays under ``global/<name>`` and the strategy's arrays (``m_t/<name>``, ...).
    strategy : dict
        The strategy's other state (:func:`strategy_state`).
    """

    run_id: str
    settings: dict[str, Any]
    stage: str
    record: dict[str, Any]
    encoder: dict | None = None
    server_round: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise CheckpointError(f"checkpoint stage {self.stage!r}: expected one of {', '.join(STAGES)}")

    def global_arrays(self) -> ArrayRecord:
        """The global ANN weights as Flower's record (bit for bit what was checkpointed)."""
        return ArrayRecord({k.removeprefix("global/"): Array(np.ascontiguousarray(v))
                            for k, v in self.arrays.items() if k.startswith("global/")})

    def write(self, out_dir: Path) -> Path:
        """Replace ``out_dir/checkpoint`` with this checkpoint, atomically and durably; returns the state file."""
        folder = Path(out_dir) / CHECKPOINT_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        arrays_file = f"arrays-{self.stage}-{self.server_round}-{secrets.token_hex(4)}.npz"
        with open(folder / arrays_file, "wb") as f:
            np.savez(f, **self.arrays)
            f.flush()
            os.fsync(f.fileno())
        fsync_folder(folder)
        strategy, settled = self._settled_rounds()
        rounds = folder / self._rounds_folder()
        for rnd, tables in settled.items():
            chunk = rounds / f"round-{rnd:05d}.json"
            if not chunk.is_file():  # written once: a settled round's tables do not change
                write_json_atomically(chunk, _encoded(tables, sparse=True), indent=None)
        state = {"format": FORMAT, "version": VERSION, "run_id": self.run_id, "settings": self.settings,
                 "stage": self.stage, "server_round": self.server_round, "record": self.record,
                 "encoder": self.encoder, "strategy": _encoded(strategy), "arrays_file": arrays_file,
                 "settled_rounds": sorted(settled)}
        path = folder / STATE_FILE
        write_json_atomically(path, state)
        for old in folder.glob("arrays-*.npz"):
            if old.name != arrays_file:
                old.unlink(missing_ok=True)
        for other in folder.glob("rounds-*"):  # an earlier run's rounds in the same output folder
            if other.name != rounds.name:
                _remove_folder(other)
        return path

    def _rounds_folder(self) -> str:
        return "rounds-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in self.run_id)

    def _settled_rounds(self) -> tuple[dict[str, Any], dict[int, dict[str, dict]]]:
        """The strategy state with only the unsettled rounds' per-site tables, and the settled rounds' tables
        by round (each ``{table: {site: value}}``)."""
        tables = self.strategy.get(PER_SITE)
        if not tables:
            return self.strategy, {}
        last = self.server_round - SETTLED_LAG
        settled: dict[int, dict[str, dict]] = {}
        recent: dict[str, dict] = {}
        for table, by_round in tables.items():
            recent[table] = {}
            for rnd, values in by_round.items():
                if int(rnd) <= last:
                    settled.setdefault(int(rnd), {})[table] = values
                else:
                    recent[table][rnd] = values
        return {**self.strategy, PER_SITE: recent}, settled

    @classmethod
    def read(cls, out_dir: Path) -> Checkpoint | None:
        """The checkpoint in ``out_dir`` (None if there is none); :class:`CheckpointError` if unreadable."""
        folder = Path(out_dir) / CHECKPOINT_FOLDER
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} checkpoint")
        try:
            with np.load(folder / str(state["arrays_file"]), allow_pickle=False) as saved:
                arrays = {name: saved[name] for name in saved.files}
            checkpoint = cls(run_id=str(state["run_id"]), settings=dict(state["settings"]),
                             stage=str(state["stage"]), record=dict(state["record"]), encoder=state["encoder"],
                             server_round=int(state["server_round"]), arrays=arrays,
                             strategy=_decoded(state["strategy"]))
            rounds = folder / checkpoint._rounds_folder()
            for rnd in state.get("settled_rounds", []):
                chunk = _settled_round(rounds / f"round-{int(rnd):05d}.json")
                for table, values in chunk.items():
                    checkpoint.strategy[PER_SITE].setdefault(table, {})[str(int(rnd))] = values
            if PER_SITE in checkpoint.strategy:  # rounds in order, as the run recorded them
                checkpoint.strategy[PER_SITE] = {table: dict(sorted(by_round.items(), key=lambda kv: int(kv[0])))
                                                 for table, by_round in checkpoint.strategy[PER_SITE].items()}
            return checkpoint
        except CheckpointError:
            raise  # already names the file that is damaged
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: a field or its arrays file is missing or damaged ({err})") from err

    def check_settings(self, settings: dict[str, Any]) -> None:
        """:class:`CheckpointError` naming the keys where ``settings`` differ from the checkpointed run's."""
        differ = sorted(key for key in set(self.settings) | set(settings) if key not in NOT_RESUMED
                        and self.settings.get(key) != settings.get(key))
        if differ:
            shown = "; ".join(f"{k}: checkpoint {self.settings.get(k)!r}, now {settings.get(k)!r}" for k in differ)
            raise CheckpointError(f"run {self.run_id} cannot resume with other settings ({shown}): give the "
                                  "checkpointed run's settings, or start afresh without resume")


def _settled_round(path: Path) -> dict:
    """One settled round's per-site tables; :class:`CheckpointError` naming ``path`` if missing or damaged."""
    try:
        chunk = _decoded(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: a settled round's file is missing or damaged ({err})") from err
    if not isinstance(chunk, dict):
        raise CheckpointError(f"{path}: a settled round's file is damaged (expected an object of per-site tables)")
    return chunk


def remove(out_dir: Path) -> None:
    """Remove the checkpoint of a finished run (its record and models are the run's result)."""
    _remove_folder(Path(out_dir) / CHECKPOINT_FOLDER)


def _remove_folder(folder: Path) -> None:
    """``folder`` and everything in it, if it exists."""
    if folder.is_dir():
        shutil.rmtree(folder)


# --- the strategy's state ---------------------------------------------------------------------------------------

def _chain(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and the strategies it wraps (``.strategy``), outermost first."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


def strategy_state(strategy: Strategy, names: dict[int, str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What ``strategy`` (and every strategy it wraps) keeps across rounds: JSON-able state with node ids
    replaced by site names (``names``), and arrays (FedOpt's moments)."""
    state: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}

    def site(node: int) -> str:
        return names.get(node, f"node {node}")

    for part in _chain(strategy):
        if isinstance(part, PerSiteRecord):
            state["per_site"] = {table: {str(rnd): {site(n): v for n, v in by_node.items()}
                                         for rnd, by_node in getattr(part.rounds, table).items()}
                                 for table in ("train", "evaluate", "failures", "privacy")}
        if isinstance(part, CentralDP):
            state["central_dp"], central = part.state()
            arrays |= {f"central_dp/{k}": v for k, v in central.items()}
        if isinstance(part, UpdateNormClipping):
            state["clipping"] = {"bounds": {str(rnd): b for rnd, b in part.bounds.items()},
                                 "norms": {str(rnd): {site(n): v for n, v in by_node.items()}
                                           for rnd, by_node in part.norms.items()}}
        for attribute in OPTIMISER_STATE:
            moments = getattr(part, attribute, None)
            if moments:
                arrays |= {f"{attribute}/{k}": np.asarray(v) for k, v in moments.items()}
    return state, arrays


def restore_strategy(strategy: Strategy, state: dict[str, Any], arrays: dict[str, np.ndarray],
                     nodes: dict[str, int]) -> None:
    """Put :func:`strategy_state`'s ``state`` and ``arrays`` back into ``strategy`` (built as the checkpointed
    run's), site names mapped to this run's node ids (``nodes``; sites that did not come back are dropped)."""

    def by_node(values: dict[str, Any]) -> dict[int, Any]:
        return {nodes[name]: value for name, value in values.items() if name in nodes}

    for part in _chain(strategy):
        if isinstance(part, PerSiteRecord) and "per_site" in state:
            tables = state["per_site"]
            part.rounds = SiteRounds(**{table: {int(rnd): by_node(values) for rnd, values in tables[table].items()}
                                        for table in ("train", "evaluate", "failures", "privacy")})
        if isinstance(part, CentralDP) and "central_dp" in state:
            part.restore(state["central_dp"], {k.removeprefix("central_dp/"): v for k, v in arrays.items()
                                               if k.startswith("central_dp/")})
        if isinstance(part, UpdateNormClipping) and "clipping" in state:
            part.bounds = {int(rnd): float(b) for rnd, b in state["clipping"]["bounds"].items()}
            part.norms = {int(rnd): by_node(values) for rnd, values in state["clipping"]["norms"].items()}
        for attribute in OPTIMISER_STATE:
            prefix = f"{attribute}/"
            moments = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
            if moments and hasattr(part, attribute):
                setattr(part, attribute, moments)


class FromRound(Strategy):
    """Run ``strategy`` from round ``done + 1``, and report each completed round with its global arrays.

    Flower's ``Strategy.start`` numbers rounds from 1; a resumed run starts it for the rounds left, and this
    wrapper shifts every round number by ``done`` so the wrapped strategy (and the sites) see the original
    numbering. ``on_round_end(server_round, arrays)`` is called once the round's evaluation is aggregated
    (the last step of a round in ``Strategy.start``): the coordinator checkpoints there.

    Parameters
    ----------
    strategy : Strategy
        The run's strategy (e.g. :class:`strategies.per_site.PerSiteRecord` around FedAvg).
    done : int, optional (default: 0)
        Rounds completed before this start.
    on_round_end : callable, optional (default: None)
    """

    def __init__(self, strategy: Strategy, done: int = 0,
                 on_round_end: Callable[[int, ArrayRecord], None] | None = None) -> None:
        self.strategy = strategy
        self.done = int(done)
        self.on_round_end = on_round_end
        self._arrays: ArrayRecord | None = None

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._arrays = arrays
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        aggregated = self.strategy.aggregate_evaluate(server_round + self.done, replies)
        if self.on_round_end is not None and self._arrays is not None:
            self.on_round_end(server_round + self.done, self._arrays)
        return aggregated


def record_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays under ``global/<name>`` (as :attr:`Checkpoint.arrays` keeps them)."""
    return {f"global/{k}": a.numpy() for k, a in arrays.items()}


# --- JSON with non-finite floats (per-site metrics may hold NaN) ------------------------------------------------

SPARSE_FROM = 64
"""Numeric lists of at least this many entries, at most half of them non-zero, are kept sparse in round files."""


def _encoded(value: Any, sparse: bool = False) -> Any:
    if isinstance(value, dict):
        return {str(k): _encoded(v, sparse) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if sparse and len(value) >= SPARSE_FROM and all(isinstance(v, int | float | np.integer | np.floating)
                                                        for v in value):  # numbers only: a ragged list of lists
            numbers = np.asarray(value)                                      # is no array (numpy raises)
            if numbers.dtype.kind in "iuf" and np.isfinite(numbers).all():
                at = np.flatnonzero(numbers)
                if 2 * len(at) <= len(numbers):
                    return {"sparse": len(numbers), "kind": numbers.dtype.kind, "at": at.tolist(),
                            "values": numbers[at].tolist()}
                return numbers.tolist()
        return [_encoded(v, sparse) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"non-finite": repr(value)}
    return value


def _decoded(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"non-finite"}:
            return float(value["non-finite"])
        if set(value) == {"sparse", "kind", "at", "values"}:
            dense = np.zeros(int(value["sparse"]), dtype=float if value["kind"] == "f" else int)
            dense[np.asarray(value["at"], dtype=int)] = value["values"]
            return dense.tolist()
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value
