"""The hospital's Flower ClientApp: answers the server from the site's own data, sending aggregates only.

The site is the folder (or CSV file) at ``node_config["data-path"]``; its name comes from
``node_config["site-name"]``, else ``site.toml``, else the folder name. A generic tabular task comes with
``node_config["task-path"]`` (a task.toml). In an in-process simulation the runner builds the app with
:func:`make_client_app` and the list of sites, indexed by the node's ``partition-id``.

Messages answered (records in, records out; never a row of data):

- ``query.site_check``: validate the site; reply counts and rates, or the first errors.
- ``query.statistics``: aggregates of the training split (``shared.encoding.SiteStatistics``) for the
  federated encoder.
- ``train``: load the global weights, train locally (DP-SGD where the site's ``site.toml`` enables it,
  within the budget kept in the site's privacy ledger), reply the weights and ε spent.
- ``evaluate``: summaries (``shared.metrics``) of the global model on the site's test split.
- ``train.xgboost``: boost one head's booster on the site's rows (``client.boosting``): the new trees for
  FedXgbBagging, the whole model for FedXgbCyclic.
- ``query.xgb_evaluate``: summaries of the final boosters (all heads) on the site's test split.
- ``query.importance``: permutation-importance loss sums of a final model on the site's test split
  (``client.importance``).
- ``query.analytics_*``: the seed paper's statistics as aggregates (``client.analytics``).

A site whose data fail validation, or whose privacy budget cannot pay for the training asked, replies an
error naming why; the server logs it and the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial, wraps
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.adjustment_handlers import adjuster_epsilon, register_adjustment
from client.analytics import register_analytics
from client.boosting import boost, new_trees
from client.hist_handlers import register_hist
from client.importance import permutation_sums
from client.ledger import BudgetExhausted, PrivacyLedger, calibrate_noise
from client.policy_handlers import register_policy
from client.training import (
    DPConfig,
    EncodedSplit,
    TrainConfig,
    encode,
    evaluate,
    sample_rate,
    split_site,
    steps_per_epoch,
    summarise_predictions,
    train,
)
from shared import boosting, metrics
from shared.ann import build_model, load_arrays, predict, to_arrays
from shared.encoding import FeatureEncoder, SiteStatistics
from shared.task import TaskSpec
from shared.validation import SiteData, SiteDataError, load_site, validate_site

MAX_ERRORS_REPORTED = 5
LEDGER_FILE = Path(".fednano") / "privacy_ledger.json"
ERROR_SITE_DATA = 4001
ERROR_PRIVACY_BUDGET = 4002


@dataclass(frozen=True)
class SiteSource:
    """Where a site's data live and, for a generic task, its task spec."""

    path: Path
    task_path: Path | None = None
    name: str | None = None
    trust_key: Path | None = None  # the coordinator's policy_signing.pub from this site's kit


def site_source(context: Context, sites: list[SiteSource] | None = None) -> SiteSource:
    """This node's data: ``data-path`` (and ``task-path``) in the node config, else the simulation's list."""
    config = context.node_config
    if "data-path" in config:
        task, trust = config.get("task-path"), config.get("trust-key")
        return SiteSource(Path(str(config["data-path"])), Path(str(task)) if task else None,
                          str(config["site-name"]) if config.get("site-name") else None,
                          Path(str(trust)) if trust else None)
    if sites is not None and "partition-id" in config:
        return sites[int(config["partition-id"])]
    raise ValueError("this SuperNode has no data: start it with --node-config 'data-path=/path/to/site'")


def _mtimes(path: Path) -> tuple[float, ...]:
    files = sorted(path.glob("*")) if path.is_dir() else [path]
    return tuple(f.stat().st_mtime_ns for f in files if f.is_file())


@lru_cache(maxsize=64)  # one simulation actor serves many sites
def _load(path: Path, task_path: Path | None, _stamp: tuple[float, ...]) -> SiteData:
    task = TaskSpec.from_toml(task_path) if task_path else None
    return load_site(path, task)


def load(source: SiteSource) -> SiteData:
    """The site's validated data (cached while its files are unchanged); raises SiteDataError."""
    return _load(source.path, source.task_path, _mtimes(source.path))


def site_name(source: SiteSource, site: SiteData | None = None) -> str:
    return source.name or (site.name if site is not None else source.path.stem)


def error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def site_check_reply(source: SiteSource) -> RecordDict:
    """Validation outcome as records: numbers as metrics, names and messages as config."""
    task = TaskSpec.from_toml(source.task_path) if source.task_path else None
    report = validate_site(source.path, task)
    name = source.name or str(report.summary.get("site") or source.path.stem)
    status = ConfigRecord({"site-name": name, "ok": report.ok,
                           "errors": [str(p) for p in report.errors[:MAX_ERRORS_REPORTED]] or [""],
                           "warnings": len(report.warnings)})
    numbers = {k: float(v) for k, v in report.summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return RecordDict({"status": status, "summary": MetricRecord(numbers if report.ok else {})})


def ledger_for(source: SiteSource, site: SiteData) -> PrivacyLedger | None:
    """The site's privacy ledger if its site.toml enables DP (``[privacy] dp = true``), else None."""
    privacy = site.config.get("privacy", {})
    if not privacy.get("dp", False):
        return None
    folder = source.path if source.path.is_dir() else source.path.parent
    return PrivacyLedger.open(folder / LEDGER_FILE, float(privacy["epsilon"]), float(privacy["delta"]))


@dataclass
class Request:
    """What a handler works on: the site's validated data and the message's config."""

    source: SiteSource
    site: SiteData
    config: ConfigRecord

    @property
    def encoder(self) -> FeatureEncoder:
        return FeatureEncoder.from_config_record(self.config)

    def rows(self, split: str):
        """The site's rows of ``split`` (train / val / test), split as every phase splits them."""
        return split_site(self.site.episodes, self.site.task, int(self.config["split-seed"]))[split]

    def encoded(self, encoder: FeatureEncoder, split: str) -> EncodedSplit:
        return encode(encoder, self.rows(split))

    def ann(self, encoder: FeatureEncoder, arrays: ArrayRecord):
        """The ANN of the config's architecture with the weights the message carries."""
        model = build_model(encoder, self.site.task, tuple(int(h) for h in self.config["hidden"]), seed=0)
        load_arrays(model, arrays)
        return model


def summaries_reply(msg: Message, summaries: dict[str, dict], n: int) -> Message:
    """Evaluation summaries per outcome as one MetricRecord (prefixed keys) with ``num-examples``."""
    record = MetricRecord({"num-examples": n})
    for name, summary in summaries.items():
        record.update(metrics.to_metric_record(summary, prefix=name))
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def boosters(msg: Message) -> dict[str, bytes]:
    return {key: bytes(value) for key, value in msg.content["boosters"].items()}


def make_client_app(sites: list[SiteSource] | None = None) -> ClientApp:
    """A ClientApp; ``sites`` serves in-process simulations where nodes have no ``data-path``."""
    client = ClientApp()

    def with_site(handler: Callable[[Message, Context, Request], Message]) -> Callable[[Message, Context], Message]:
        """Load and validate this node's site first; invalid data is an error reply, never a crash."""

        @wraps(handler)
        def wrapper(msg: Message, context: Context) -> Message:
            source = site_source(context, sites)
            try:
                site = load(source)
            except SiteDataError as err:
                return error_reply(msg, ERROR_SITE_DATA, f"{site_name(source)}: {err}")
            return handler(msg, context, Request(source, site, msg.content["config"]))

        return wrapper

    @client.query("site_check")
    def site_check(msg: Message, context: Context) -> Message:
        return Message(site_check_reply(site_source(context, sites)), reply_to=msg)

    @client.query("statistics")
    @with_site
    def statistics(msg: Message, context: Context, request: Request) -> Message:
        numbers, names = SiteStatistics.from_frame(request.rows("train"), request.site.task).to_records()
        return Message(RecordDict({"statistics": numbers, "names": names}), reply_to=msg)

    @client.train()
    @with_site
    def train_round(msg: Message, context: Context, request: Request) -> Message:
        config, encoder = request.config, request.encoder
        data = request.encoded(encoder, "train")
        model = request.ann(encoder, msg.content["arrays"])
        server_round = int(config["server-round"])
        settings = TrainConfig(epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
                               lr=float(config["lr"]), proximal_mu=float(config.get("proximal-mu", 0.0)),
                               seed=int(config["seed"]) + server_round)
        reply = {"num-examples": len(data), "server-round": server_round}
        ledger = ledger_for(request.source, request.site)
        if ledger is None:
            result = train(model, data, settings)
        else:
            try:
                dp = _dp_for_run(context, ledger, config, len(data), settings,
                                 reserved=adjuster_epsilon(request.site.config))
                steps = settings.epochs * steps_per_epoch(len(data), settings.batch_size)
                ledger.check_affordable(dp.noise_multiplier, sample_rate(len(data), settings.batch_size), steps)
            except BudgetExhausted as err:
                name = site_name(request.source, request.site)
                return error_reply(msg, ERROR_PRIVACY_BUDGET, f"{name} refuses to train: {err}")
            accountant = ledger.accountant()
            result = train(model, data, settings, dp, history=accountant.history)
            accountant.history = result.history
            ledger.record_from_accountant(accountant, run_id=str(context.run_id), server_round=server_round)
            reply.update({"epsilon": ledger.spent(), "epsilon-budget": ledger.epsilon_budget,
                          "delta": ledger.delta, "noise-multiplier": dp.noise_multiplier})
        reply.update({"train-loss": result.mean_loss, "steps": result.steps})
        return Message(RecordDict({"arrays": to_arrays(model), "metrics": MetricRecord(reply)}), reply_to=msg)

    @client.evaluate()
    @with_site
    def evaluate_round(msg: Message, context: Context, request: Request) -> Message:
        encoder = request.encoder
        data = request.encoded(encoder, "test")
        return summaries_reply(msg, evaluate(request.ann(encoder, msg.content["arrays"]), encoder, data), len(data))

    @client.train("xgboost")
    @with_site
    def train_boosting(msg: Message, context: Context, request: Request) -> Message:
        config, encoder = request.config, request.encoder
        data = request.encoded(encoder, "train")
        head = _head(config)
        settings = boosting.BoostingConfig(eta=float(config["eta"]), max_depth=int(config["max-depth"]),
                                           local_rounds=int(config["local-rounds"]), seed=int(config["seed"]))
        global_model = msg.content["arrays"]["0"].numpy().tobytes()
        before = boosting.rounds_in(global_model)
        booster = boost(global_model, boosting.dmatrix(data.x, boosting.head_labels(head, data.targets)),
                                 settings.params(head.kind), settings.local_rounds)
        model = new_trees(booster, before) if config["mode"] == "bagging" else bytes(booster.save_raw("json"))
        arrays = ArrayRecord([np.frombuffer(model, dtype=np.uint8)])
        reply = MetricRecord({"num-examples": len(data), "server-round": int(config["server-round"])})
        return Message(RecordDict({"arrays": arrays, "metrics": reply}), reply_to=msg)

    @client.evaluate("xgboost")
    @with_site
    def evaluate_head(msg: Message, context: Context, request: Request) -> Message:
        """One head's booster on the site's test split (FedXgbCyclic asks after every round)."""
        encoder = request.encoder
        data = request.encoded(encoder, "test")
        head = _head(request.config)
        labels = boosting.head_labels(head, data.targets)
        scores = boosting.load(msg.content["arrays"]["0"].numpy().tobytes()).predict(boosting.dmatrix(data.x))
        if head.kind == "regression":
            labels = encoder.decode_regression(head.outcome, labels)
            scores = encoder.decode_regression(head.outcome, scores)
        return summaries_reply(msg, {head.key: metrics.summarise(head.kind, labels, scores)}, len(data))

    @client.query("xgb_evaluate")
    @with_site
    def evaluate_boosting(msg: Message, context: Context, request: Request) -> Message:
        encoder = request.encoder
        data = request.encoded(encoder, "test")
        predictions = boosting.predict_heads(boosters(msg), encoder, data.x)
        return summaries_reply(msg, summarise_predictions(encoder, data, predictions), len(data))

    @client.query("importance")
    @with_site
    def importance(msg: Message, context: Context, request: Request) -> Message:
        encoder = request.encoder
        data = request.encoded(encoder, "test")
        if request.config["family"] == "ann":
            predict_fn = partial(predict, request.ann(encoder, msg.content["arrays"]))
        else:
            predict_fn = partial(boosting.predict_heads, boosters(msg), encoder)
        sums = permutation_sums(predict_fn, encoder, data, seed=int(request.config["seed"]))
        return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=msg)

    register_analytics(client, lambda context: site_source(context, sites), load, ledger_for)
    register_hist(client, lambda context: site_source(context, sites), load, ledger_for)
    register_policy(client, lambda context: site_source(context, sites), load)
    register_adjustment(client, lambda context: site_source(context, sites), load, ledger_for)
    return client


def _head(config: ConfigRecord) -> boosting.Head:
    positive = int(config["positive-class"])
    return boosting.Head(str(config["outcome"]), str(config["kind"]), positive if positive >= 0 else None)


def _dp_for_run(context: Context, ledger: PrivacyLedger, config: ConfigRecord, n_rows: int,
                settings: TrainConfig, reserved: float = 0.0) -> DPConfig:
    """The noise multiplier of this run, fixed at the run's first round so that the planned rounds spend
    at most the site's budget less ``reserved`` (the dose adjuster's share, ``client.adjustment_handlers``),
    and kept in the node's context state for later rounds."""
    key = "dp-run"
    state = context.state.get(key)
    if state is not None and state["run-id"] == str(context.run_id):
        return DPConfig(noise_multiplier=float(state["noise-multiplier"]),
                        max_grad_norm=float(config["max-grad-norm"]))
    rounds_left = int(config["num-rounds"]) - int(config["server-round"]) + 1
    steps = rounds_left * settings.epochs * steps_per_epoch(n_rows, settings.batch_size)
    try:
        sigma = calibrate_noise(ledger.epsilon_budget - reserved, ledger.delta,
                                sample_rate(n_rows, settings.batch_size), steps, history=ledger.history)
    except BudgetExhausted as err:
        raise BudgetExhausted(
            f"privacy budget exhausted ({ledger.path}): budget ε={ledger.epsilon_budget:g} at δ={ledger.delta:g}, "
            f"spent ε={ledger.spent():.3f}; no noise level lets this run's {steps} steps fit") from err
    context.state[key] = ConfigRecord({"run-id": str(context.run_id), "noise-multiplier": sigma})
    return DPConfig(noise_multiplier=sigma, max_grad_norm=float(config["max-grad-norm"]))


app = make_client_app()

