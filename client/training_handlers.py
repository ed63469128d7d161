"""The site's side of a federated run's first phases: site check, statistics, and the ANN's train/evaluate.

- ``query.site_check``: validate the site's files; reply the verdict with the problems in shareable form
  (file, column, row numbers, rule — never a value), counts and rates (not under DP: they come from its
  rows), and the site's privacy terms for the run (``client.dp``: ε per phase, phases refused and why).
- ``query.statistics``: the training split's statistics for the federated encoder (``client.statistics``),
  noised under DP; a DP site keeps its noised row count to weight itself by later (post-processing).
- ``train``: load the global weights, train locally (DP-SGD under DP, its σ set at the first round for the
  run's ``training`` ε), reply the weights and :class:`shared.protocol.training.TrainReply`; in a one-message
  round a site without DP first evaluates the received model and adds its summaries (``EVALUATE_RECEIVED``).
- masked rounds (``strategies.pairwise_masked_mean``): a ``train`` message that says ``secure-sum`` is answered
  with n·w and n (``shared.protocol.training.weighted_vector``) in two-lane fixed point, masked by the one
  secure-sum protocol (``client.secure_aggregation``, Bonawitz et al., CCS 2017: pairwise masks under the
  session's release label, or round 2 of the dropout-recovering protocol), never a label the site masked before;
  the key, share and unmask rounds are ``client.secure_aggregation``'s handlers as ``query.ann_keys``,
  ``query.ann_shares`` and ``query.ann_unmask`` (:func:`ann_unmask`: a repeated round's senders checked). Noise of
  a DP site is in its weights before they are masked, and only training charges its ledger (the protocol's other
  rounds release fresh random keys and shares, no patient value).
- ``evaluate``: summaries of the global model on the test split (``client.evaluation``); under DP one
  release of the ``evaluation`` phase (the server asks a DP site at the final round only).
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import run_state
from client import secure_aggregation as sa
from client.dp import (
    PhaseRelease,
    PrivacyRefused,
    release_key,
    release_tag,
    start_run,
    training_noise,
    training_seed,
)
from client.evaluation import private_summaries, summaries
from client.ledger import BudgetExhausted, LedgerError
from client.run_state import run_context
from client.site import SiteHandlers, SiteRequest, load, site_dp
from client.statistics import noised_rows, private_statistics
from shared import metrics
from shared.encoding import SiteStatistics
from shared.protocol import ErrorCode, messages
from shared.protocol import hist as h
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RELEASE_INDEX, RELEASES, SitePrivacy
from shared.protocol.site_check import SiteCheckReply, plan_of, resumed_run
from shared.protocol.training import (
    EVAL_BINS,
    EVALUATE_RECEIVED,
    MASKED,
    RECEIVED_EVALUATION,
    ROSTER_NAMES,
    AnnTraining,
    TrainReply,
    layout_of,
    proximal_mu,
    server_round,
    weighted_vector,
)
from shared.validation import SiteDataError

MAX_ERRORS_REPORTED = 5
_STATE_ROWS = "dp-noised-rows"
MASKED_ROUNDS_KEY = "ann-masked-rounds"
"""Context state (kept on the site's disk for a resumed run, ``client.run_state``): per round this run masked, the
roster it was masked among (by name); recovering, also the round's release label, its participants' ids and names,
and (``sent <round>``) the names of the sites whose masked weights the site helped unmask (:func:`ann_unmask`)."""


def site_check(msg: Message, context: Context, handlers: SiteHandlers) -> Message:
    """Validate this node's site and say its privacy terms for the run announced in the message."""
    source = handlers.source(context)
    resumes = resumed_run(msg.content)
    context = run_state.adopt(context, resumes, source.folder) if resumes is not None else run_context(context)
    try:  # one validation, whose tables the site's cache keeps for the run's later messages (client.site.load)
        site = load(source)
        report = site.report
    except SiteDataError as err:
        site, report = None, err.report
    name = source.name or str(report.summary.get("site") or source.path.stem)
    problems, privacy = report.shareable_errors(), SitePrivacy(dp=False)
    if site is not None:
        problems, privacy = _privacy_terms(msg, context, source, site)
    summary = {} if problems or privacy.dp else {k: float(v) for k, v in report.summary.items()
                                                 if isinstance(v, int | float) and not isinstance(v, bool)}
    reply = SiteCheckReply(site=name, ok=not problems, errors=problems[:MAX_ERRORS_REPORTED],
                           warnings=len(report.warnings), summary=summary, privacy=privacy)
    run_state.keep(context, source.folder)
    return Message(reply.to_records(), reply_to=msg)


def _privacy_terms(msg: Message, context: Context, source, site) -> tuple[list[str], SitePrivacy]:
    """The loaded site's privacy terms for the run (planned now, kept for the run's later messages), or the
    problems that keep it out: a ledger that cannot be trusted, privacy settings that break a rule."""
    try:
        dp = site_dp(source, site)
        terms = start_run(context, dp, plan_of(msg.content)).terms(dp) if dp is not None else SitePrivacy(dp=False)
    except (LedgerError, BudgetExhausted, ValueError) as err:
        return [f"privacy terms unusable: {err}"], SitePrivacy(dp=False)
    return [], terms


def statistics(msg: Message, request: SiteRequest) -> RecordDict:
    """The training split's statistics, through the DP release when the site is under DP."""
    task = request.site.task
    exact = SiteStatistics.from_frame(request.rows("train"), task)
    content = RecordDict()
    if request.dp is None:
        numbers, names = exact.to_records()
    else:
        release = PhaseRelease.for_phase(request.context, request.dp, "statistics", releases=1)
        noised, facts = private_statistics(exact, task, release)
        request.context.state[_STATE_ROWS] = ConfigRecord({"run-id": str(request.context.run_id),
                                                            "rows": noised_rows(noised)})
        numbers, names = noised.to_records()
        content[r.PRIVACY] = facts.to_record()
    content[r.STATISTICS], content[r.NAMES] = numbers, names
    return content


def _noised_rows(request: SiteRequest) -> float:
    """The row count a DP site released in this run's statistics (its FedAvg weight)."""
    state = request.context.state.get(_STATE_ROWS)
    if state is None or str(state["run-id"]) != str(request.context.run_id):
        raise PrivacyRefused("this run has no noised row count from the statistics phase to weight the site by; "
                             "a DP site sends no exact count")
    return float(state["rows"])


def train_round(msg: Message, request: SiteRequest) -> RecordDict:
    """One round of local training from the global weights."""
    # torch (and Opacus for a DP site) load with the first message that trains (client.app)
    from client.training import DPConfig, TrainConfig, sample_rate, steps_per_epoch, train
    from shared.ann import to_arrays

    settings = AnnTraining.from_config(request.config)
    data = request.encoded("train")
    model = request.ann(msg.content[r.ARRAYS])
    received = received_evaluation(request, model) if EVALUATE_RECEIVED in request.config else None
    this_round = server_round(request.config)
    local = TrainConfig(epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                        proximal_mu=proximal_mu(request.config), seed=settings.seed + this_round)
    dp = request.dp
    if dp is None:
        result = train(model, data, local)
        reply = TrainReply(num_examples=len(data), server_round=this_round, steps=result.steps,
                           train_loss=result.mean_loss)
    else:
        rate = sample_rate(len(data), local.batch_size)
        per_round = local.epochs * steps_per_epoch(len(data), local.batch_size)
        rounds_left = settings.num_rounds - this_round + 1
        sigma = training_noise(request.context, dp, rate, rounds_left * per_round)
        run = str(request.context.run_id)
        # A resumed run may ask a round again: rounds of this run already charged are not counted twice, and
        # the same weights as a release already charged for this round (training is seeded, so the same model
        # and data give them) tell nothing new: charged once. Other weights are charged, if they still fit.
        charged = dp.ledger.charged_rounds(run, "training")
        later = sum(1 for n in range(this_round + 1, settings.num_rounds + 1) if n not in charged)
        again = this_round in charged
        if later or not again:
            dp.ledger.check_affordable(sigma, rate, (later + (not again)) * per_round)
        accountant = dp.ledger.accountant()
        local = replace(local, seed=training_seed(dp.ledger, run, "training", this_round))  # not the coordinator's
        result = train(model, data, local, DPConfig(noise_multiplier=sigma, max_grad_norm=settings.max_grad_norm),
                       history=accountant.history)
        accountant.history = result.history
        tag = release_tag(release_key(dp.ledger), run, "training", this_round,
                          {k: a.numpy() for k, a in to_arrays(model).items()})
        if again and not dp.ledger.released(run, "training", this_round, tag):
            dp.ledger.check_affordable(sigma, rate, (later + 1) * per_round)  # a new release: nothing sent if not
        dp.ledger.record_from_accountant(accountant, run_id=run, server_round=this_round, phase="training",
                                         release=tag)
        reply = TrainReply(num_examples=_noised_rows(request), server_round=this_round, steps=result.steps,
                           epsilon=dp.ledger.spent(), epsilon_budget=dp.ledger.epsilon_budget,
                           delta=dp.ledger.delta, noise_multiplier=sigma)
    weights = to_arrays(model)
    if bool(request.config.get(h.SECURE_SUM, False)):
        weights = masked_weights(request, msg.content[r.ARRAYS], weights, reply.num_examples, this_round)
    content = RecordDict({r.ARRAYS: weights, r.METRICS: reply.to_metric_record()})
    if received is not None:
        content[RECEIVED_EVALUATION] = received
    return content


def masked_weights(request: SiteRequest, received: ArrayRecord, trained: ArrayRecord, weight: float,
                   this_round: int) -> ArrayRecord:
    """The trained weights as the masked sum's summands: ``weight · w`` and ``weight``
    (``shared.protocol.training.weighted_vector``) in two-lane fixed point, masked by the one secure-sum protocol
    (``client.secure_aggregation.masked_floats``: pairwise masks under the session's release label, or round 2 of
    the recovering protocol; a label is never used twice, an entry past the fixed-point bound is refused). A round
    this run masked before among other sites (by name) is refused too: a resumed run's repeated round, whose seeded
    weights are the same, summed over a second set of sites would give away the difference."""
    config = request.config
    roster = ",".join(sorted(str(name) for name in config.get(ROSTER_NAMES, [])))
    masked_rounds = request.context.state.get(MASKED_ROUNDS_KEY)
    run = str(request.context.run_id)
    if masked_rounds is None or str(masked_rounds["run-id"]) != run:
        masked_rounds = request.context.state[MASKED_ROUNDS_KEY] = ConfigRecord({"run-id": run})
    if str(this_round) in masked_rounds and str(masked_rounds[str(this_round)]) != roster:
        raise ShareableError(f"round {this_round} was masked before among other sites: its (seeded, so identical) "
                             "weights summed over a second set of sites would reveal the sites in one set and not "
                             "the other; refusing")
    layout = layout_of({k: a.numpy() for k, a in received.items()})
    vector = weighted_vector({k: a.numpy() for k, a in trained.items()}, weight, layout)
    words = sa.masked_floats(vector, config, request.context)
    masked_rounds[str(this_round)] = roster
    if sa.recovering(config):  # for the unmask round (ann_unmask): which release this round is, and who is who
        masked_rounds[f"label {this_round}"] = sa.release_label(config)
        masked_rounds[f"ids {this_round}"] = [int(n) for n in config[h.SECURE_PARTICIPANTS]]
        masked_rounds[f"names {this_round}"] = [str(name) for name in config[ROSTER_NAMES]]
    return ArrayRecord({MASKED: words})


def ann_unmask(msg: Message, request: SiteRequest) -> RecordDict:
    """``query.ann_unmask``: round 3 of a recovering masked round (``client.secure_aggregation.unmask``), refused
    when this run summed the round before over other sites (by name): the roster check of :func:`masked_weights`
    compares the sites the round was masked among, this one the subset whose masked weights arrived, so that a
    resumed run's repeated round cannot give two sums of the same seeded weights over different sets."""
    config, masked_rounds = request.config, request.context.state.get(MASKED_ROUNDS_KEY)
    label = sa.release_label(config)
    rounds = [key.removeprefix("label ") for key, value in (masked_rounds or {}).items()
              if key.startswith("label ") and str(value) == label]
    if rounds:
        names = dict(zip((int(n) for n in masked_rounds[f"ids {rounds[0]}"]),
                         map(str, masked_rounds[f"names {rounds[0]}"]), strict=True))
        sent = ",".join(sorted(names.get(int(n), f"node {n}") for n in config[h.SECURE_SENT]))
        before = masked_rounds.get(f"sent {rounds[0]}")
        if before is not None and str(before) != sent:
            raise ShareableError(f"round {rounds[0]} was summed before over other sites: unmasking its repeated sum "
                                 "over a second set would reveal the sites in one set and not the other; refusing")
        masked_rounds[f"sent {rounds[0]}"] = sent
    return sa.unmask(msg, request.context).content


def received_evaluation(request: SiteRequest, model) -> ConfigRecord | None:
    """A one-message round's evaluation of the received global model, before it is trained
    (``shared.protocol.training.EVALUATE_RECEIVED``): what ``evaluate`` would reply, as a ConfigRecord; None
    for a DP site."""
    if request.dp is not None:
        return None
    return ConfigRecord(dict(summaries_on_test_split(request, model)[r.METRICS]))


def summaries_reply(request: SiteRequest, predictions: dict, data) -> RecordDict:
    """Evaluation summaries per outcome as one MetricRecord (prefixed keys) with ``num-examples``; under DP
    one release of the ``evaluation`` phase (index and count from the request)."""
    encoder = request.encoder
    if request.dp is None:
        n_bins = int(request.config.get(EVAL_BINS, metrics.DEFAULT_N_BINS))
        result, n, privacy = summaries(encoder, data, predictions, n_bins=n_bins), len(data), None
    else:
        release = PhaseRelease.for_phase(request.context, request.dp, "evaluation",
                                         releases=int(request.config[RELEASES]))
        result, facts = private_summaries(encoder, data, predictions, release, int(request.config[RELEASE_INDEX]))
        n, privacy = max((s["n"] for s in result.values()), default=0), facts
    record = MetricRecord({r.NUM_EXAMPLES: n})
    for name, summary in result.items():
        record.update(metrics.to_metric_record(summary, prefix=name))
    content = RecordDict({r.METRICS: record})
    if privacy is not None:
        content[r.PRIVACY] = privacy.to_record()
    return content


def summaries_on_test_split(request: SiteRequest, model) -> RecordDict:
    """:func:`summaries_reply` of ``model`` on the site's test split."""
    from shared.ann import predict  # torch: loaded by the messages that use it (client.app)

    data = request.encoded("test")
    return summaries_reply(request, predict(model, data.x), data)


def evaluate_round(msg: Message, request: SiteRequest) -> RecordDict:
    return summaries_on_test_split(request, request.ann(msg.content[r.ARRAYS]))


def register_training(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the site-check, statistics, train and evaluate handlers, and the masked ANN rounds', to ``client``."""

    @client.query(messages.SITE_CHECK.action)
    def check(msg: Message, context: Context) -> Message:
        return site_check(msg, context, handlers)

    client.query(messages.STATISTICS.action)(handlers(statistics))
    client.query(messages.ANN_KEYS.action)(sa.refusing(sa.keys, ErrorCode.REQUEST))
    client.query(messages.ANN_SHARES.action)(sa.refusing(sa.shares, ErrorCode.REQUEST))
    client.query(messages.ANN_UNMASK.action)(handlers(ann_unmask))
    client.train()(handlers(train_round))
    client.evaluate()(handlers(evaluate_round))
