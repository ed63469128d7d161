"""The settings of a federated run, and their defaults: the one place they are written.

A deployed run reads them from the run config (``pyproject.toml [tool.flwr.app.config]``, overridden by
``flwr run --run-config 'k=v'``; keys are the field names hyphenated), an in-process simulation from
``fednano simulate``'s options (``simulation.experiment.ExperimentConfig``), whose defaults are these.
``tests/test_settings.py`` checks that the CLI, the experiment runner and pyproject agree with this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from shared.config import settings_from_run_config
from shared.hist_boosting import SCALE_BITS
from shared.protocol.boosting import MODES
from shared.protocol.hist import secure_sum_mode
from shared.protocol.personalisation import choice_rule, family_problem, parse_methods
from shared.task import NANOPARTICLE_TASK, TaskSpec
from strategies.central_dp import MECHANISMS, CentralDPParameters, central_dp_problem
from strategies.pairwise_masked_mean import masking_problem
from strategies.robust import RobustParameters

MODEL_FAMILIES = ("ann", "xgboost")
POLICY_MODELS = ("ensemble", "structured")
"""What the dosing policy is built on: the federated ANN + XGBoost ensemble (``shared.dosing_policy``) or the
structured dose-response models fitted by federated Newton–Raphson (``shared.structured_policy``)."""
CENTRAL_ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants for central DP's ε (``server.central_accounting``): Rényi DP (Mironov 2017) or the PRV
accountant (Gopi et al. 2021)."""
ANN_SECURE_MODES = ("auto", "pairwise", "recovering", "off")
"""How the ANN rounds sum the sites' weights (``strategies.pairwise_masked_mean``): ``auto`` follows ``secure-sum``
(pairwise or recovering) where the strategy allows it, ``pairwise`` / ``recovering`` always (refused with a strategy
that needs each update), ``off`` plain."""
AUTO_MASKED_MAX_SITES = 100
"""``ann-secure-sum auto`` masks recovering rounds of at most this many training sites: the recovering protocol
(``shared.secagg_plus``) sends every site's shares to every peer, K − 1 ciphertexts per site and K² key agreements
per lost site, and its masks were measured at K² (``shared.secure_sum.mask`` of 20,000 words, 2026-12-04: 0.26 s
per site and round at 1,000 sites, ~130 s per round on two cores). Above it, ``auto`` sends plain replies and says
why. Pairwise rounds are masked by ``auto`` at any size: above 27 sites a site masks with its
``shared.secure_sum.PAIRWISE_DEGREE`` ring neighbours (Bell et al., CCS 2020), and 1,000 clinics × 10 masked rounds
took 433.6 s against 352 s plain (2026-12-04, quiet; BENCHMARKS "1,000 clinics"). ``pairwise`` and ``recovering``
asked explicitly mask at any size."""
POLICY_REFERENCES = ("absolute", "standard_of_care")
"""What the structured policy's confidence bounds are taken against (``shared.structured_policy``)."""


def parse_hidden(text: str) -> tuple[int, ...]:
    """Hidden layer widths from ``"64,32"``; ``ValueError`` naming the text if it is not positive integers."""
    try:
        widths = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError as err:
        raise ValueError(f"hidden: expected comma-separated positive integers such as 64,32; got {text!r}") from err
    if not widths or min(widths) < 1:
        raise ValueError(f"hidden: expected comma-separated positive integers such as 64,32; got {text!r}")
    return widths


def parse_models(text: str) -> tuple[str, ...]:
    """Model families from ``"ann,xgboost"``; ``ValueError`` naming an unknown one."""
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(names) - set(MODEL_FAMILIES))
    if unknown or not names:
        raise ValueError(f"models: unknown or none {', '.join(unknown) or text!r}: expected "
                         f"{', '.join(MODEL_FAMILIES)} (comma-separated)")
    return names


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a federated run, with its default.

    Parameters
    ----------
    num_server_rounds : int, default 10
        Training rounds of the neural network.
    strategy : str, default "fedavg"
        Aggregation (``strategies.choice.STRATEGIES``): fedavg, fedprox, fedadam, fedyogi, or a robust one
        (krum, multikrum, bulyan, fedmedian, fedtrimmedavg, rowtrimmedavg: ``strategies.robust``).
    malicious_sites : int, default -1 (derived)
        f, the malicious sites a robust strategy must tolerate; negative: one site in ten of the training sites,
        at least one. A run whose sites cannot meet the strategy's requirement (Krum n ≥ 2f + 3, Bulyan
        n ≥ 4f + 3, ...) is refused.
    trim_fraction : float, default -1.0 (derived)
        FedTrimmedAvg's β, the share dropped at each end of every coordinate; negative: (f + ½)/n.
    clip_norm : float, default 0.0 (off)
        Bound on the L2 norm of each site's ANN update before aggregation (``strategies.update_clipping``).
    clip_median_factor : float, default 0.0 (off)
        Instead of a fixed bound: clip each update to this multiple of the round's median update norm
        (``strategies.update_clipping.MedianNormClipping``); not together with ``clip_norm``.
    central_dp : str, default "" (off)
        Central DP for the ANN (``strategies.central_dp``): ``fixed`` (McMahan et al. 2018) or ``adaptive``
        (Andrew et al. 2021) server-side clipping of each site's whole update and Gaussian noise on the average:
        user-level DP of the global model sequence, accounted in the record's ``central_dp``. FedAvg or FedProx
        only, without ``clip_norm`` / ``clip_median_factor``. It adds to the sites' own DP, never replaces it: a
        site whose site.toml sets ``dp = true`` still trains with DP-SGD, and the record keeps both accounts.
    central_noise_multiplier : float, default 1.0
        z: noise sd over the sensitivity C/n of the average (adaptive: of the update and count releases together).
    central_clip : float, default 1.0
        C, the clipping norm of a site's update (adaptive: its initial norm C_0). Near the median ANN update norm
        measured on 10 simulated clinics (0.4–4.3 in round 1, median 1.5; 0.4–2.3 by round 3, median 1.1).
    central_delta : float, default 1e-5
        δ at which the record states central DP's ε.
    central_accountant : str, default "rdp"
        ``rdp`` or ``prv`` (:data:`CENTRAL_ACCOUNTANTS`).
    local_epochs, batch_size, lr : int, int, float
        Local training per round.
    hidden : str, default "64,32"
        Hidden layer widths of the MLP.
    seed, split_seed : int
        Seed of the models and of the sites' train/val/test split.
    max_grad_norm : float, default 1.0
        DP-SGD's per-sample clipping norm.
    proximal_mu, server_lr : float
        FedProx's μ; FedAdam's and FedYogi's server learning rate.
    min_nodes : int, default 1
        The site check waits for this many SuperNodes.
    task_path : str, default ""
        A generic task's task.toml; empty for the built-in nanoparticle task.
    out_dir : str, default "runs/federation"
        Where the run record and the models go.
    models : str, default "ann,xgboost"
        Model families to train.
    boosting : str, default "hist"
        Federated XGBoost: hist (trees grown from the sites' summed gradient histograms: equal to pooled
        boosting without DP, and the only mode a DP site can join) | bagging | cyclic (Flower's strategies,
        kept for comparison).
    xgb_rounds, xgb_eta, xgb_max_depth : int, float, int
        Boosting rounds per head, learning rate, depth.
    xgb_scale_bits : int, default ``shared.hist_boosting.SCALE_BITS``
        ``--boosting hist``: fixed-point scale of the summed gradients and hessians (``TreeParams.scale_bits``).
    xgb_hist_batch_heads : bool, default True
        ``--boosting hist``: grow a round's trees of every head in the same level requests (one exchange per
        level, ``server.hist_phase``); false grows the heads one after the other (one exchange per head and level).
    secure_sum : str, default "pairwise"
        How the federated statistics (``server.statistics_phase``), hist boosting and the policy phase's model fits
        (``server.adjustment_phase``, ``server.dose_response_phase``) sum the sites' statistics, counts, histograms
        and fit sums (``shared.protocol.hist.SECURE_SUM_MODES``, ``server.secure_aggregation``):
        ``pairwise`` masks (one key exchange per phase, one exchange per release; a site lost mid-phase stops
        the head), ``recovering`` (Bonawitz et al.'s dropout-recovering secure aggregation: four exchanges per
        release, lost sites recovered and the tree regrown on the survivors) or ``off`` (plain sums).
    ann_secure_sum : str, default "auto"
        How the ANN rounds sum the sites' weights (:data:`ANN_SECURE_MODES`), through the one secure sum
        (``server.secure_aggregation``, ``strategies.pairwise_masked_mean``): every site sends n_i·w_i and n_i in
        fixed point, masked; the coordinator unmasks the sum and divides, and never sees one site's model.
        ``pairwise`` — one key exchange per phase, a site lost in a round fails that round; ``recovering`` —
        Bonawitz et al.'s dropout recovery, three more exchanges per round, a site lost before or after sending
        its masked weights is recovered and the round aggregates over the others. Both are refused with a robust
        strategy, update-norm clipping or central DP, which need each site's update. ``auto`` — ``secure_sum``'s
        mode (pairwise or recovering) when it is not ``off`` and the strategy, clipping and central-DP settings
        allow it (and at least 2 sites train; recovering: at most :data:`AUTO_MASKED_MAX_SITES`), else plain, with
        the reason printed and recorded (``ModelRecord.secure_sum``). ``off`` — plain replies.
    signing_key : str, default ""
        The coordinator's policy_signing.key: with it the run ends by building, signing and sending the policy.
    policy_dir : str, default ""
        Where signed bundles and the version counter live (default OUT/policy); keep one across runs.
    fqi_iterations : int, default 25
        Fitted-Q iterations of the federated dose adjuster (0: none); each is one message round.
    release_gate : bool, default True
        Sign and send the policy only if the sites' off-policy estimates show it beats their standard of care
        (``shared.off_policy``). False skips the decision (the estimates are still asked for and recorded, and
        the manifest says the gate was skipped): for tests of the distribution itself, never for patients.
    policy_model : str, default "structured"
        The policy's outcome models (:data:`POLICY_MODELS`): ``structured`` (dose-response models fitted from the
        sites' Newton sums, ``server.dose_response_phase``) or ``ensemble`` (this run's ANN + XGBoost).
        Structured scored far above the ensemble on the same worlds (BENCHMARKS.md, "Structured dose–response
        policy") and has the ensemble's monotone guard (a worse organ function never raises the dose); sites
        under DP refuse its sums, and with no site left the run falls back to the ensemble candidate and
        records why. Either candidate goes through the same release gate and signing.
    policy_reference : str, default "absolute"
        The structured policy's scores (:data:`POLICY_REFERENCES`): ``absolute`` picks the action with the best
        pessimistic utility (z = 1); ``standard_of_care`` leaves each site's own standard of care (its usual
        formulation at the label dose, learned from its logs and given to every record it serves:
        ``client.site_gate``) only where the lower bound of the predicted improvement over it is positive
        (z = 0.5). Absolute is the default by measurement: in the closed loop (BENCHMARKS.md, attempt 5) the
        relative policy's last versions were lower at 3 of 4 seeds and still truly worse at the one small site.
    personalise : str, default ""
        Personalised models each site trains after the federation and chooses among with its local-only and the
        global model, comma-separated, empty: none: ANN methods (``shared.protocol.personalisation.METHODS``) and
        boosting ones (``BOOSTING_METHODS``: ``site-trees``, at sites without DP); optionally one ANN choice rule
        (``CHOICE_RULES``; default ``pooled-non-dp``: the sites without DP take the default their pooled validation
        evidence sets, each DP site its own rule; ``site``: every site its own rule; ``pooled``, ``pooled-equal``,
        ``pooled-site``: every site's evidence pooled).
    one_message_rounds : bool, default True
        A site without DP evaluates the model it receives with each round's training message and replies with
        both, so a round is one exchange and only the final model is evaluated apart
        (``strategies.per_site.PerSiteRecord``); False: Flower's train then evaluate exchange in every round.
        The figures recorded are the same.
    resume : bool, default False
        Continue the run whose checkpoint is in ``out_dir`` (``server.checkpoint``) from its last completed
        round or phase, under its original run id, instead of starting afresh; the other settings must be the
        checkpointed run's. Without a checkpoint there the run starts afresh.
    """

    num_server_rounds: int = 10
    strategy: str = "fedavg"
    malicious_sites: int = -1
    trim_fraction: float = -1.0
    clip_norm: float = 0.0
    clip_median_factor: float = 0.0
    central_dp: str = ""
    central_noise_multiplier: float = 1.0
    central_clip: float = 1.0
    central_delta: float = 1e-5
    central_accountant: str = "rdp"
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.005
    hidden: str = "64,32"
    seed: int = 0
    split_seed: int = 0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.1
    server_lr: float = 0.05
    min_nodes: int = 1
    task_path: str = ""
    out_dir: str = "runs/federation"
    models: str = "ann,xgboost"
    boosting: str = "hist"
    xgb_rounds: int = 20
    xgb_eta: float = 0.1
    xgb_max_depth: int = 4
    xgb_scale_bits: int = SCALE_BITS
    xgb_hist_batch_heads: bool = True
    secure_sum: str = "pairwise"
    ann_secure_sum: str = "auto"
    signing_key: str = ""
    policy_dir: str = ""
    fqi_iterations: int = 25
    release_gate: bool = True
    policy_model: str = "structured"
    policy_reference: str = "absolute"
    personalise: str = ""
    one_message_rounds: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        parse_hidden(self.hidden)
        parse_methods(self.personalise)
        choice_rule(self.personalise)  # one rule at most: the ANN choice's (server.app)
        if problem := family_problem(self.personalise, parse_models(self.models)):
            raise ValueError(problem)
        if self.policy_model not in POLICY_MODELS:
            raise ValueError(f"policy-model: expected one of {', '.join(POLICY_MODELS)}; got {self.policy_model!r}")
        if self.policy_reference not in POLICY_REFERENCES:
            raise ValueError(f"policy-reference: expected one of {', '.join(POLICY_REFERENCES)}; "
                             f"got {self.policy_reference!r}")
        if self.clip_norm > 0 and self.clip_median_factor > 0:
            raise ValueError(f"clip-norm and clip-median-factor: choose one update norm bound; got {self.clip_norm} "
                             f"and {self.clip_median_factor}")
        if self.central_dp:
            self.central_dp_parameters()
            if problem := central_dp_problem(self.strategy, self.clip_norm, self.clip_median_factor):
                raise ValueError(problem)
        if not 0 < self.central_delta < 1:
            raise ValueError(f"central-delta: expected a number in (0, 1); got {self.central_delta}")
        if self.central_accountant not in CENTRAL_ACCOUNTANTS:
            raise ValueError(f"central-accountant: expected one of {', '.join(CENTRAL_ACCOUNTANTS)}; "
                             f"got {self.central_accountant!r}")
        secure_sum_mode(self.secure_sum)
        if self.ann_secure_sum not in ANN_SECURE_MODES:
            raise ValueError(f"ann-secure-sum: expected one of {', '.join(ANN_SECURE_MODES)}; "
                             f"got {self.ann_secure_sum!r}")
        if self.ann_secure_sum in ("pairwise", "recovering") and (problem := self._masking_problem()):
            raise ValueError(f"ann-secure-sum {self.ann_secure_sum}: {problem}")
        if self.boosting not in MODES:
            raise ValueError(f"boosting: expected one of {', '.join(MODES)}; got {self.boosting!r}")

    @classmethod
    def from_run_config(cls, run_config: dict) -> RunSettings:
        return settings_from_run_config(cls, run_config)

    def to_run_config(self) -> dict[str, object]:
        """The settings as run-config keys (hyphenated)."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return parse_hidden(self.hidden)

    @property
    def model_names(self) -> tuple[str, ...]:
        return parse_models(self.models)

    def robust_parameters(self, n_sites: int) -> RobustParameters:
        """A robust strategy's f and β for ``n_sites`` training sites, the unset ones derived."""
        return RobustParameters.of(n_sites, self.malicious_sites, self.trim_fraction)

    def central_dp_parameters(self) -> CentralDPParameters | None:
        """The run's central-DP choice, or None without (``ValueError`` naming the key if it is not valid)."""
        if not self.central_dp:
            return None
        if self.central_dp not in MECHANISMS:
            raise ValueError(f"central-dp: expected one of {', '.join(MECHANISMS)} (or empty: off); "
                             f"got {self.central_dp!r}")
        return CentralDPParameters(self.central_dp, self.central_noise_multiplier, self.central_clip)

    def _masking_problem(self) -> str | None:
        return masking_problem(self.strategy, self.clip_norm, self.clip_median_factor, self.central_dp)

    def ann_masking(self, n_trainers: int) -> tuple[str, str]:
        """How the ANN rounds of ``n_trainers`` training sites are summed — ``off``, ``pairwise`` or
        ``recovering`` (``shared.protocol.hist.SECURE_SUM_MODES``) — and why (printed and recorded with the run);
        ``ValueError`` for an explicit ``pairwise`` or ``recovering`` that cannot run."""
        asked = self.ann_secure_sum
        if asked == "off":
            return "off", "ann-secure-sum is off"
        if asked == "auto" and self.secure_sum == "off":
            return "off", "secure-sum is off (ann-secure-sum auto follows it)"
        if problem := self._masking_problem():
            return "off", problem  # auto only: an explicit mode was refused in __post_init__
        if n_trainers < 2:
            why = f"{n_trainers} site trains: a masked sum needs at least 2 to hide each site among the others"
            if asked != "auto":
                raise ValueError(f"ann-secure-sum {asked}: {why}")
            return "off", why
        if asked == "auto" and secure_sum_mode(self.secure_sum) == "recovering" and n_trainers > AUTO_MASKED_MAX_SITES:
            return "off", (f"{n_trainers} sites train: ann-secure-sum auto masks recovering rounds of at most "
                           f"{AUTO_MASKED_MAX_SITES} sites (every site shares with every peer; ask ann-secure-sum "
                           "recovering to mask anyway, or secure-sum pairwise)")
        if asked == "auto":
            mode = secure_sum_mode(self.secure_sum)
            return mode, f"ann-secure-sum auto (secure-sum {mode})"
        return asked, f"ann-secure-sum {asked}"

    def task(self) -> TaskSpec:
        return TaskSpec.from_toml(self.task_path) if self.task_path else NANOPARTICLE_TASK


DEFAULTS = RunSettings()
"""The defaults every front end reads."""

RUN_CONFIG_KEYS = tuple(f.name.replace("_", "-") for f in fields(RunSettings))
