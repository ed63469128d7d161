"""Poisoned clinics for experiments (``fednano simulate --attack SITE:KIND``): a site that attacks the federation.

The attack belongs to the simulated world, not to the hospital's code: the honest ClientApp (``client.app``)
has no attack in it. The experiment runner gives the attacking site's node

- a Flower client mod (:func:`attack_mod`) around the honest handlers, which rewrites what the site sends:
  ``sign-flip`` and ``scale`` rewrite its ANN training replies (message ``train``), ``lie`` its evaluation
  summaries (every ``evaluate`` message);
- for ``label-flip``, a copy of its data with the labels flipped (:func:`poisoned_copy`), on which the honest
  code trains, computes its statistics and evaluates; the experiment itself still judges every model on the
  true data.

Kinds (``KIND`` or ``KIND=FACTOR``):

- ``sign-flip``: the negated update, −FACTOR × (trained − global) (default 1; Fang et al., USENIX Security
  2020, https://arxiv.org/abs/1911.11815, study this "reversed gradient" family);
- ``scale``: the update scaled, FACTOR × (trained − global) (default 10; the boosted update of Bhagoji et al.,
  ICML 2019, https://arxiv.org/abs/1811.12470);
- ``label-flip``: every binary outcome flipped (0 ↔ 1) in the site's rows (response and grade-3 toxicity in
  the built-in task);
- ``lie``: the site reports its binary outcomes' evaluation summaries with positives and negatives swapped
  (its released AUC becomes 1 − AUC); the model is untouched, the released metrics are not; its error sums,
  left as computed, no longer fit its swapped histograms, so the run record leaves it out of the overall
  metrics (``shared.metrics_bounds``; a DP site's summaries are not checked);
- ``inflate``: the site reports every numeric column's sum in its federated statistics multiplied by FACTOR
  (default 10; counts and centred sums of squares as computed), plain or masked (:func:`inflate_statistics`):
  the encoder's means move by (FACTOR − 1) × the site's share of each column's sum unless the coordinator's
  feasibility check (``shared.sum_bounds``) refuses the sum (masked) or drops the site (``secure-sum = off``);
- ``inflate-hist``: with ``--boosting hist``, the site reports its gradient and hessian histograms multiplied by
  FACTOR (default 2; row counts as computed), plain, masked or noised (:func:`inflated_hist`): the feasibility
  check of ``shared.hist_bounds`` drops it (``secure-sum = off``) or stops the heads (masked);
- ``inflate-fit``: the site reports the sums of the dosing models' fits multiplied by FACTOR (default 2; row counts
  as computed): the structured dose–response models' gradient, information and log-likelihood, and the dose
  adjuster's fitted-Q scaling (sums and sums of squares) and ridge sums (``A``, ``b``), plain, masked or before
  its DP noise (:func:`inflated_fit`): the feasibility check of ``shared.fit_bounds`` drops it (``secure-sum =
  off``) or refuses the fit (masked: the policy is built without that model);
- ``inflate-gate``: the site reports its release-gate value sums (Γ of the candidate and of standard of care,
  their difference and its square) multiplied by FACTOR (default 2; the cycle count as computed), before its DP
  noise (:func:`inflated_gate`): the check of ``shared.value_bounds`` drops it from the gate where the result
  is infeasible; within the bounds it pulls the gate's estimate by its share of the cycles.

XGBoost's bagging/cyclic trees and the other phases' sums are not attacked by these kinds. For the federated analytics
(``fednano analytics``, no ``--attack`` there), :func:`inflated_analytics` makes one in-process site report every
released sum that is not a row count multiplied by FACTOR (``benchmarks/sum_bounds.py``, the tests): the
feasibility check of ``shared.analytics_bounds`` drops it (plain) or refuses the analysis (masked). For histogram
boosting, :func:`inflated_hist` makes the sites it names report their gradient and hessian histograms multiplied
by FACTOR (every row's gradient and hessian scaled before binning; row counts as computed), plain, masked or
noised: the feasibility check of ``shared.hist_bounds`` drops such a site (plain) or stops the heads (masked).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import adjustment_handlers, hist_handlers, policy_handlers, secure_statistics
from client import analytics as site_analytics
from client.site import SiteSource
from shared import hist_boosting
from shared.dose_adjustment import DoseAdjuster
from shared.protocol import hist as hist_protocol
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.training import MASKED
from shared.schema import EPISODES_FILE
from shared.task import NANOPARTICLE_TASK, TaskSpec
from shared.toxicity_model import ToxicityModel
from shared.tumour_response import TumourResponseModel
from shared.validation import load_site

KINDS = ("sign-flip", "scale", "label-flip", "lie", "inflate", "inflate-hist", "inflate-fit", "inflate-gate")
DEFAULT_FACTORS = {"sign-flip": 1.0, "scale": 10.0}
"""FACTOR of the update kinds when none is given."""
STATISTICS_FACTORS = {"inflate": 10.0}
"""FACTOR of the statistics kinds when none is given; the other kinds take none (but ``inflate-hist``)."""
HIST_FACTORS = {"inflate-hist": 2.0}
"""FACTOR of the histogram-boosting kind when none is given."""
FIT_FACTORS = {"inflate-fit": 2.0}
"""FACTOR of the model-fit kind when none is given."""
GATE_FACTORS = {"inflate-gate": 2.0}
"""FACTOR of the release-gate kind when none is given."""
UPDATE_KINDS = tuple(DEFAULT_FACTORS)
"""The kinds that rewrite the site's plain ANN weights: not with masked rounds, whose replies are words
(``simulation.experiment.ExperimentConfig.ann_masking`` turns masking off for them)."""

ATTACKS_DIR = "attacks"
"""Under the experiment's output: the label-flipping sites' poisoned copies."""


class AttackError(ValueError):
    """An ``--attack`` that cannot be run as given; says why."""


@dataclass(frozen=True)
class Attack:
    """One attacking site and how it attacks.

    Parameters
    ----------
    site : str
        The site's name (its ``site.toml`` name or folder name, e.g. ``clinic_03``).
    kind : str
        One of :data:`KINDS`.
    factor : float
        The update's multiplier for ``sign-flip`` and ``scale``, the sums' for ``inflate``; 0 for the others.
    """

    site: str
    kind: str
    factor: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Attack:
        """``SITE:KIND`` or ``SITE:KIND=FACTOR``, e.g. ``clinic_03:scale=10``."""
        site, sep, rest = text.partition(":")
        kind, has_factor, factor_text = rest.partition("=")
        kind = kind.strip()
        if not sep or not site.strip() or kind not in KINDS:
            raise AttackError(f"--attack {text!r}: expected SITE:KIND with KIND one of {', '.join(KINDS)} "
                              f"(e.g. clinic_03:scale or clinic_03:scale=10)")
        factored = {**DEFAULT_FACTORS, **STATISTICS_FACTORS, **HIST_FACTORS, **FIT_FACTORS, **GATE_FACTORS}
        if has_factor and kind not in factored:
            raise AttackError(f"--attack {text!r}: only {', '.join(factored)} take a factor")
        try:
            factor = float(factor_text) if has_factor else factored.get(kind, 0.0)
        except ValueError as err:
            raise AttackError(f"--attack {text!r}: the factor must be a number") from err
        if kind in factored and not (np.isfinite(factor) and factor > 0):
            raise AttackError(f"--attack {text!r}: the factor must be a positive number")
        return cls(site=site.strip(), kind=kind, factor=factor)

    def to_record(self) -> dict:
        """What results.json says about the attack."""
        return dataclasses.asdict(self)

    def poison_update(self, global_arrays: dict[str, np.ndarray], trained: ArrayRecord) -> ArrayRecord:
        """The arrays the attacker sends instead of ``trained``: global + multiplier × (trained − global)."""
        multiplier = -self.factor if self.kind == "sign-flip" else self.factor
        out = ArrayRecord()
        for key, array in trained.items():
            local = array.numpy()
            g = global_arrays[key]
            out[key] = Array((g + multiplier * (local.astype(np.float64) - g)).astype(local.dtype))
        return out


def inflate_statistics(content: RecordDict, factor: float) -> RecordDict:
    """A ``query.statistics`` reply's content with every numeric column's sum × ``factor`` (in place)."""
    metrics = content[r.STATISTICS]
    metrics["numeric.sum"] = [float(v) * factor for v in metrics["numeric.sum"]]
    return content


def swap_binary_labels(record) -> None:
    """In a MetricRecord of evaluation summaries (``shared.metrics.to_metric_record``), swap positives and
    negatives of every binary outcome (histograms and confusion counts), in place."""
    prefixes = [key[: -len("/tp")] for key in record if key.endswith("/tp")]
    for prefix in prefixes:
        for a, b in (("hist_pos", "hist_neg"), ("tp", "fp"), ("fn", "tn")):
            ka, kb = f"{prefix}/{a}", f"{prefix}/{b}"
            record[ka], record[kb] = record[kb], record[ka]


def attack_mod(attacks: dict[int, Attack]) -> Callable[[Message, Context, Callable], Message]:
    """A Flower client mod rewriting the replies of the nodes in ``attacks`` (partition id → attack)."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        attack = attacks.get(int(context.node_config.get("partition-id", -1)))
        if attack is None:
            return call_next(msg, context)
        kind, message_type = attack.kind, msg.metadata.message_type
        poisons_update = kind in DEFAULT_FACTORS and message_type == messages.TRAIN.type
        global_arrays = ({k: a.numpy().astype(np.float64) for k, a in msg.content[r.ARRAYS].items()}
                         if poisons_update else None)
        if kind in GATE_FACTORS and message_type == messages.POLICY_VALUE.type:
            with inflated_gate(attack.factor):  # before its DP noise, this one call of this site
                return call_next(msg, context)
        if kind in FIT_FACTORS and message_type in FIT_MESSAGES:
            with inflated_fit(attack.factor):  # before noise and masks, this one call of this site
                return call_next(msg, context)
        if kind in HIST_FACTORS and message_type == messages.HIST_LEVEL.type:
            with inflated_hist({int(context.node_id)}, attack.factor):  # before noise, masks and packing
                return call_next(msg, context)
        if kind in STATISTICS_FACTORS and message_type == messages.STATISTICS_MASKED.type:
            # the masked handler computes its statistics with client.secure_statistics.statistics: poisoned for
            # this one call, before the site lays them out and masks them
            honest = secure_statistics.statistics
            with mock.patch.object(secure_statistics, "statistics",
                                   lambda m, req: inflate_statistics(honest(m, req), attack.factor)):
                return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if poisons_update:
            if MASKED in reply.content[r.ARRAYS]:
                raise AttackError(f"{kind} rewrites plain weights; this training reply is masked (run the attack "
                                  "with --ann-secure-sum off)")
            reply.content[r.ARRAYS] = attack.poison_update(global_arrays, reply.content[r.ARRAYS])
        elif kind in STATISTICS_FACTORS and message_type == messages.STATISTICS.type:
            inflate_statistics(reply.content, attack.factor)
        elif kind == "lie" and message_type.split(".")[0] == messages.EVALUATE.category:
            for record in reply.content.metric_records.values():
                swap_binary_labels(record)
        return reply

    return mod


def flip_labels(frame: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """``frame`` with every binary outcome of ``task`` flipped (0 ↔ 1; missing stays missing)."""
    frame = frame.copy()
    for outcome in task.outcomes:
        if outcome.kind == "binary" and outcome.name in frame:
            flipped = 1 - frame[outcome.name]
            frame[outcome.name] = flipped.astype("Int64") if flipped.notna().all() else flipped
    return frame


def poisoned_copy(source: SiteSource, out: Path) -> SiteSource:
    """A copy of ``source``'s data under ``out`` with its labels flipped (``label-flip``), under the same site
    name; the original stays as it is (the experiment judges models on it)."""
    task = source.task() or NANOPARTICLE_TASK
    if source.path.is_dir():
        target = out / source.path.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source.path, target)
        rows = target / EPISODES_FILE
    else:
        target = rows = out / source.path.name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(source.path, rows)
    frame = pd.read_csv(rows)
    flip_labels(frame, task).to_csv(rows, index=False, lineterminator="\n")
    return dataclasses.replace(source, path=target)


def site_names(sources: list[SiteSource]) -> list[str]:
    """Each source's site name as the run record names it (``site.toml`` name, else the folder name)."""
    names = []
    for source in sources:
        try:
            names.append(source.name or load_site(source.path, source.task()).name)
        except Exception:  # noqa: BLE001 - an invalid site is left out by the run; it can still be named
            names.append(source.path.stem)
    return names


def attackers_by_partition(attacks: list[Attack], sources: list[SiteSource]) -> dict[int, Attack]:
    """The attacks by the partition id of their site; :class:`AttackError` if a site is unknown or attacks
    twice."""
    names = site_names(sources) if attacks else []
    by_partition: dict[int, Attack] = {}
    for attack in attacks:
        if attack.site not in names:
            raise AttackError(f"--attack {attack.site}:{attack.kind}: no site {attack.site!r} in this run "
                              f"(sites: {', '.join(names)})")
        index = names.index(attack.site)
        if index in by_partition:
            raise AttackError(f"--attack: the site {attack.site} is given two attacks; one per site")
        by_partition[index] = attack
    return by_partition


def attacked_sources(attacks: list[Attack], sources: list[SiteSource], out: Path
                     ) -> tuple[list[SiteSource], list]:
    """The sources the simulation's ClientApp serves and the client mods it runs with: label-flipping sites
    on a poisoned copy under ``out / ATTACKS_DIR``, every attacker behind :func:`attack_mod`."""
    by_partition = attackers_by_partition(attacks, sources)
    if not by_partition:
        return sources, []
    served = list(sources)
    for index, attack in by_partition.items():
        if attack.kind == "label-flip":
            served[index] = poisoned_copy(sources[index], out / ATTACKS_DIR)
    return served, [attack_mod(by_partition)]


ANALYTICS_COUNTS = ("count", "histogram", "outcome-count", "projection", "min", "max")
"""Arrays of an analytics answer that :func:`inflate_analytics` leaves as computed: row counts (and the extremes,
which are not sums); so is a Gram matrix's leading entry, its row count."""


FIRST_MOMENTS = ("sum", "raw-sum", "outcome-sum", "xty", "gradient")
"""The sums of values (not of squares or products) of the analytics answers: what moves a mean or a coefficient."""


def inflate_analytics(release: site_analytics.Release, factor: float,
                      arrays: tuple[str, ...] | None = None) -> site_analytics.Release:
    """One analytics answer with every released sum that is not a row count (or only those named in ``arrays``,
    e.g. :data:`FIRST_MOMENTS`) multiplied by ``factor``."""

    def scaled(name: str, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        kind = name.rsplit("/", 1)[-1]
        if kind in ANALYTICS_COUNTS or (arrays is not None and kind not in arrays):
            return values
        out = values * factor
        if name.rsplit("/", 1)[-1] == "gram":
            out.flat[0] = values.flat[0]
        return out

    return dataclasses.replace(
        release, blocks={n: dataclasses.replace(b, values=scaled(n, b.values)) for n, b in release.blocks.items()},
        exact={n: scaled(n, v) for n, v in release.exact.items()})


@contextmanager
def inflated_analytics(frame: pd.DataFrame, factor: float, arrays: tuple[str, ...] | None = None) -> Iterator[None]:
    """While open, the site whose table is ``frame`` (this very object) answers every analytics query through
    :func:`inflate_analytics` (``arrays``: which sums; None, all but the counts), plain or masked (its sums
    inflated before noise and masks, as a modified client would); every other site answers honestly."""

    def poisoned(honest: Callable) -> Callable:
        def query(table: pd.DataFrame, config, request_arrays) -> site_analytics.Release:
            release = honest(table, config, request_arrays)
            return inflate_analytics(release, factor, arrays) if table is frame else release
        return query

    with mock.patch.dict(site_analytics.REQUESTS, {q: poisoned(f) for q, f in site_analytics.REQUESTS.items()}):
        yield


@contextmanager
def inflated_hist(nodes: set[int], factor: float) -> Iterator[None]:
    """While open, the sites whose Flower node ids are ``nodes`` answer every histogram-boosting level request
    with every row's gradient and hessian multiplied by ``factor`` before they are binned (so every summed bin,
    noised, masked or plain, is ``factor`` times the honest one up to the fixed-point rounding), ignoring the
    request's gradient bound as a modified client would (``client.hist_handlers.level_histograms``); every other
    site answers honestly."""
    honest, honest_gradients = hist_handlers.level_histograms, hist_boosting.gradients

    def scaled(objective, y, margin):
        g, h = honest_gradients(objective, y, margin)
        return g * factor, h * factor

    def poisoned(config, arrays, x, y, clip, context):
        if int(context.node_id) not in nodes:
            return honest(config, arrays, x, y, clip, context)
        loose = ConfigRecord({k: v for k, v in config.items() if k != hist_protocol.GRADIENT_BOUND})
        with mock.patch.object(hist_boosting, "gradients", scaled):
            return honest(loose, arrays, x, y, clip, context)

    with mock.patch.object(hist_handlers, "level_histograms", poisoned):
        yield


FIT_MESSAGES = (messages.DOSE_RESPONSE_SUMS.type, messages.FQI_SCALING.type, messages.FQI_RIDGE.type)
"""The model fits' summed releases :func:`inflated_fit` poisons."""
FIT_INFLATED = {"gradient", "hessian", "loglik", "gram", "moment", "sum", "m2", "shifted_sum", "shifted_square"}
"""The sums of a fit release that :func:`inflated_fit` scales; the row counts (``n``, ``count``) stay as computed."""


def _inflating(honest: Callable, factor: float) -> Callable:
    def poisoned(*args, **kwargs):
        sums = honest(*args, **kwargs)
        return {k: (np.asarray(v, dtype=np.float64) * factor if k in FIT_INFLATED else v) for k, v in sums.items()}
    return poisoned


@contextmanager
def inflated_fit(factor: float) -> Iterator[None]:
    """While open, every site answering a model-fit request in this process (the caller opens it around the
    attacker's answer only: :func:`attack_mod`, the tests' and benchmark's in-process grids) computes its sums
    multiplied by ``factor`` but its row counts (:data:`FIT_INFLATED`), before any DP noise and masking, as a
    modified client would: the dose–response models' ``site_sums``, the dose adjuster's exact and clipped ridge
    sums and the exact and DP-bounded scaling sums."""
    with mock.patch.object(TumourResponseModel, "site_sums", _inflating(TumourResponseModel.site_sums, factor)), \
            mock.patch.object(ToxicityModel, "site_sums", _inflating(ToxicityModel.site_sums, factor)), \
            mock.patch.object(DoseAdjuster, "ridge_sums", _inflating(DoseAdjuster.ridge_sums, factor)), \
            mock.patch.object(DoseAdjuster, "clipped_ridge_sums", _inflating(DoseAdjuster.clipped_ridge_sums,
                                                                              factor)), \
            mock.patch.object(adjustment_handlers, "scaling_sums",
                              _inflating(adjustment_handlers.scaling_sums, factor)), \
            mock.patch.object(adjustment_handlers, "bounded_scaling_sums",
                              _inflating(adjustment_handlers.bounded_scaling_sums, factor)):
        yield


def inflate_value_sums(sums, factor: float):
    """A site's :class:`shared.off_policy.ValueSums` with every sum but the cycle count multiplied by ``factor``."""
    return dataclasses.replace(sums, candidate=sums.candidate * factor, standard=sums.standard * factor,
                               difference=sums.difference * factor, difference_sq=sums.difference_sq * factor)


@contextmanager
def inflated_gate(factor: float) -> Iterator[None]:
    """While open, every site valuing a candidate in this process (the caller opens it around the attacker's
    answer only) releases :func:`inflate_value_sums` of its honest value sums, before any DP noise, as a modified
    client would (``client.policy_handlers``' call of ``client.ope.site_value_sums``)."""
    honest = policy_handlers.site_value_sums
    with mock.patch.object(policy_handlers, "site_value_sums",
                           lambda *args, **kwargs: inflate_value_sums(honest(*args, **kwargs), factor)):
        yield
