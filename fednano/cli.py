"""The ``fednano`` command: one front for the federation's jobs.

Each command is a thin shell over the package that owns the job (``shared`` for validation, ``simulation``
for the simulated world); heavy imports happen inside the command so ``fednano --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

SITE_MAX_EPSILON = 20.0
"""The largest ε a site.toml may declare (``shared.validation.MAX_EPSILON``; not imported, to keep ``--help``
instant; tests/test_settings.py checks they agree)."""
MAX_CLINICS = 1000
"""The most simulated clinics one command makes: the scale measured on one 2-core machine (BENCHMARKS.md,
``benchmarks/scale.py``)."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.command()
def validate(
    path: Path = typer.Argument(..., help="A site folder (episodes.csv, vitals.csv, site.toml) or a CSV file."),
    task: Path | None = typer.Option(None, "--task", help="task.toml of a generic tabular task."),
) -> None:
    """Check a site's files against the data contract; exit 1 naming file, column and rows if they fail."""
    from shared.task import TaskSpec, TaskSpecError
    from shared.validation import validate_site

    try:
        spec = TaskSpec.from_toml(task) if task is not None else None
    except TaskSpecError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    report = validate_site(path, spec)
    typer.echo(report.format(), err=not report.ok)
    raise typer.Exit(0 if report.ok else 1)


@app.command("simulate-data")
def simulate_data(
    clinics: int = typer.Option(5, "--clinics", min=1, max=MAX_CLINICS, help="Number of clinics (sites)."),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed writes the same bytes."),
    out: Path = typer.Option(Path("runs/sites"), "--out", help="Folder to write one site folder per clinic into."),
    patients_per_clinic: int | None = typer.Option(
        None, "--patients-per-clinic", min=1, help="Same size for every clinic (default: tens to hundreds)."),
) -> None:
    """Simulate clinics from the ground-truth world and write one valid site folder each."""
    from rich.console import Console
    from rich.table import Table

    from shared.validation import validate_site
    from simulation.clinics import generate_sites

    world = generate_sites(clinics, seed, out, patients_per_clinic)
    table = Table(title=f"{clinics} simulated clinics (seed {seed}) in {out}")
    for column in ("site", "patients", "episodes", "vitals rows", "formulations", "response", "grade≥3 tox", "valid"):
        table.add_column(column, justify="right")
    failed = False
    for clinic in world.clinics:
        report = validate_site(out / clinic.name)
        failed |= not report.ok
        s = report.summary
        table.add_row(clinic.name, str(s.get("n_patients")), str(s.get("n_episodes")), str(s.get("n_vitals")),
                      str(s.get("n_formulations")), _rate(s.get("response_rate")),
                      _rate(s.get("toxicity_grade3_rate")), "yes" if report.ok else "NO")
    Console().print(table)
    if failed:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True})
def simulate(
    ctx: typer.Context,
    clinics: int = typer.Option(5, "--clinics", min=2, max=MAX_CLINICS,
                                 help="Simulated clinics (ignored with --sites)."),
    patients_per_clinic: int | None = typer.Option(
        None, "--patients-per-clinic", min=1, help="Same size for every simulated clinic (default: tens to "
        "hundreds)."),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="Federated rounds (default 10)."),
    dp: bool | None = typer.Option(
        None, "--dp/--no-dp", help="Simulated sites train with DP-SGD (site.toml budget). Default on, but off with "
        "--central-dp; --central-dp with --dp keeps both (two accounts in the record, never added)."),
    epsilon: float = typer.Option(3.0, "--epsilon", min=0.01, max=SITE_MAX_EPSILON,
                                  help="Per-site ε budget of simulated sites."),
    strategy: str | None = typer.Option(
        None, "--strategy", help="fedavg | fedprox | fedadam | fedyogi, or robust to poisoned sites: krum | "
        "multikrum | bulyan | fedmedian | fedtrimmedavg | rowtrimmedavg."),
    malicious_sites: int | None = typer.Option(
        None, "--malicious-sites", min=0, help="Malicious sites a robust strategy must tolerate (default: one in "
        "ten sites, at least one); a run with too few sites for it is refused (Krum n ≥ 2f+3, Bulyan n ≥ 4f+3)."),
    trim_fraction: float | None = typer.Option(
        None, "--trim-fraction", min=0.0, max=0.4999, help="fedtrimmedavg: share trimmed at each end "
        "(default (f + 0.5) / sites)."),
    clip_norm: float | None = typer.Option(
        None, "--clip-norm", min=0.0, help="Clip each site's ANN update to this L2 norm before aggregating "
        "(default 0: off)."),
    clip_median_factor: float | None = typer.Option(
        None, "--clip-median-factor", min=0.0, help="Instead of --clip-norm: clip each site's ANN update to this "
        "multiple of the round's median update norm, a bound taken from the norms seen (default 0: off)."),
    central_dp: str | None = typer.Option(
        None, "--central-dp", help="Central DP of the ANN instead of (or, with --dp, on top of) the sites' DP-SGD: "
        "fixed | adaptive server-side clipping of each site's whole update + Gaussian noise (fedavg/fedprox)."),
    central_noise_multiplier: float | None = typer.Option(
        None, "--central-noise-multiplier", min=0.0, help="Central DP's z: noise sd / (clip / sites) (default 1)."),
    central_clip: float | None = typer.Option(
        None, "--central-clip", min=0.0, help="Central DP's clipping norm of a site's update; adaptive: the initial "
        "norm (default 1)."),
    central_delta: float | None = typer.Option(
        None, "--central-delta", min=0.0, max=1.0, help="δ at which central DP's ε is stated (default 1e-5)."),
    central_accountant: str | None = typer.Option(
        None, "--central-accountant", help="rdp (default) | prv: the Opacus accountant of central DP's ε."),
    attack: list[str] | None = typer.Option(
        None, "--attack", help="Experiments: SITE:KIND[=FACTOR] makes a site attack, repeatable; KIND sign-flip "
        "(=1) | scale (=10) | label-flip | lie (swapped evaluation summaries)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, the splits and the models."),
    out: Path = typer.Option(Path("runs/simulate"), "--out", help="Output folder."),
    sites: list[Path] | None = typer.Option(
        None, "--sites", help="Site folders or CSV files to use instead: --sites A B C (or --sites A --sites B)."),
    task: Path | None = typer.Option(None, "--task", help="task.toml for --sites holding a generic task."),
    local_epochs: int | None = typer.Option(None, "--local-epochs", min=1, help="Local epochs per round (1)."),
    models: str | None = typer.Option(None, "--models", help="Models to train: ann, xgboost, or both (both)."),
    boosting: str | None = typer.Option(None, "--boosting", help="Federated XGBoost: bagging | cyclic | hist."),
    xgb_rounds: int | None = typer.Option(None, "--xgb-rounds", min=1, help="Federated boosting rounds per head."),
    secure_sum: str | None = typer.Option(
        None, "--secure-sum", help="The statistics', analytics', hist boosting's and the policy's model-fit sums: "
        "pairwise (default; masks, one key exchange, a site lost mid-phase fails the statistics / the fit / stops "
        "the head) | recovering (dropout recovery, ~4x the message exchanges) | off."),
    ann_secure_sum: str | None = typer.Option(
        None, "--ann-secure-sum", help="ANN rounds: auto (default; masked sums in --secure-sum's mode when it is not "
        "off and the strategy only needs the mean, else plain with the reason printed) | pairwise | recovering "
        "(dropout recovery; both refused with robust strategies, clipping or central DP) | off."),
    compare: bool = typer.Option(True, "--compare/--no-compare",
                                 help="Also random forest, SVM, gradient boosting (local-only, pooled)."),
    deploy_cycles: int = typer.Option(
        1, "--deploy-cycles", min=1, max=20,
        help="Closed loop: refit until policy version K, the clinics treating new patients with their installed "
             "policy between versions (simulated clinics only; each run may spend ε / K)."),
    deploy_patients: int | None = typer.Option(
        None, "--deploy-patients", min=1, max=5000,
        help="New patients per clinic per deployment period (default: half the clinic's own)."),
    explore: bool = typer.Option(
        False, "--explore", help="Closed loop: randomise first cycles inside the safety rules, every action logged "
        "with its probability (decisions.csv): a ±25 % dose spread, and a 1:1 trial arm of a candidate the gate "
        "stopped in equipoise."),
    policy_model: str | None = typer.Option(
        None, "--policy-model", help="The dosing policy's models: structured (default; dose-response models by "
        "federated Newton; DP sites refuse it, and with no site left the ensemble is built) | ensemble (ANN + "
        "XGBoost)."),
    policy_reference: str | None = typer.Option(
        None, "--policy-reference", help="The structured policy's scores: absolute (default; best pessimistic "
        "utility) | standard_of_care (leave each site's standard of care only where the lower bound of the "
        "improvement is positive)."),
    personalise: str = typer.Option(
        "", "--personalise", help="Personalised models each site trains after the federation and chooses among with "
        "its local-only and the global model on its validation split: ANNs finetune, ditto, fedper, mix (the "
        "global and local-only models' predictions averaged); boosters site-trees (the federation's trees plus 10 "
        "grown at the site), mix-trees (the federation's and the local-only boosters' predictions averaged) (sites "
        "without DP) (comma-separated). The ANN "
        "choice's default: by default (pooled-non-dp) the sites without DP pool their validation evidence and take "
        "the federation's default, each DP site keeps its own rule; add site (every site its own rule), or pooled, "
        "pooled-equal, pooled-site (every site's evidence pooled) to choose otherwise."),
    policy: bool = typer.Option(
        True, "--policy/--no-policy", help="Build, sign and evaluate the dosing policy (built-in task; --no-policy: "
        "the outcome models only)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Run the simulated SuperNodes on a running Ray cluster (HOST:PORT of its head; "
        "every node needs the project at the same path) instead of a Ray of this command's own."),
    supernode_cpus: float = typer.Option(
        1.0, "--supernode-cpus", min=0.1, help="CPUs Ray reserves per simulated SuperNode (actors: cluster CPUs / "
        "this)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's own log."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the experiment in this OUT folder that stopped (a crash, Ctrl-C) from its "
        "federation's last completed round, with its own options and sites (the other options are ignored)."),
) -> None:
    """Run a federated experiment on one machine: Flower simulation, local-only and pooled baselines, report.

    Unset options take the federated run's defaults (``server/settings.py``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from server.settings import ANN_SECURE_MODES, POLICY_MODELS, POLICY_REFERENCES, parse_models
    from shared.protocol.boosting import MODES
    from shared.protocol.hist import SECURE_SUM_MODES
    from shared.protocol.personalisation import family_problem, parse_methods
    from simulation.experiment import (
        ExperimentConfig,
        ExperimentError,
        flower_environment,
        quiet_flower,
        run_experiment,
    )
    from simulation.termination import stop_on_sigterm
    from strategies.choice import STRATEGIES

    base = ExperimentConfig()  # unset options: the run's defaults, from server/settings.py
    strategy = strategy or base.strategy
    boosting = boosting or base.boosting
    secure_sum = secure_sum or base.secure_sum
    ann_secure_sum = ann_secure_sum or base.ann_secure_sum
    models = models or base.models
    rounds = rounds or base.rounds
    policy_model = policy_model or base.policy_model
    policy_reference = policy_reference or base.policy_reference
    if policy_reference not in POLICY_REFERENCES:
        raise typer.BadParameter(f"expected one of {', '.join(POLICY_REFERENCES)}", param_hint="--policy-reference")
    if policy_model not in POLICY_MODELS:
        raise typer.BadParameter(f"expected one of {', '.join(POLICY_MODELS)}", param_hint="--policy-model")
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"expected one of {', '.join(STRATEGIES)}", param_hint="--strategy")
    if boosting not in MODES:
        raise typer.BadParameter(f"expected one of {', '.join(MODES)}", param_hint="--boosting")
    if secure_sum not in SECURE_SUM_MODES:
        raise typer.BadParameter(f"expected one of {', '.join(SECURE_SUM_MODES)}", param_hint="--secure-sum")
    if ann_secure_sum not in ANN_SECURE_MODES:
        raise typer.BadParameter(f"expected one of {', '.join(ANN_SECURE_MODES)}", param_hint="--ann-secure-sum")
    try:
        parse_models(models)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--models") from err
    try:
        parse_methods(personalise)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--personalise") from err
    if problem := family_problem(personalise, parse_models(models)):
        raise typer.BadParameter(problem, param_hint="--personalise")
    central = _central_dp_options(base, strategy, central_dp, central_noise_multiplier, central_clip, central_delta,
                                  central_accountant)
    dp = not central["central_dp"] if dp is None else dp  # central DP alone unless --dp asks for both
    sites = _site_paths(ctx, sites)
    if explore and deploy_cycles < 2:
        raise typer.BadParameter("exploration happens in the closed loop's deployment periods: give "
                                 "--deploy-cycles 2 or more", param_hint="--explore")
    if deploy_cycles > 1 and not policy:
        raise typer.BadParameter("the closed loop deploys the dosing policy: drop --no-policy",
                                 param_hint="--deploy-cycles")
    if deploy_cycles > 1 and (sites or task):
        raise typer.BadParameter("the closed loop needs the simulator's world to treat new patients: "
                                 "simulated clinics only (no --sites)", param_hint="--deploy-cycles")
    if ray_address is not None:
        from simulation.flower_runtime import ray_head_problem

        if problem := ray_head_problem(ray_address):
            raise typer.BadParameter(problem, param_hint="--ray-address")
    if ann_secure_sum in ("pairwise", "recovering"):
        from strategies.pairwise_masked_mean import masking_problem

        problem = masking_problem(strategy, base.clip_norm if clip_norm is None else clip_norm,
                                  base.clip_median_factor if clip_median_factor is None else clip_median_factor,
                                  central["central_dp"])
        if problem:
            raise typer.BadParameter(problem, param_hint="--ann-secure-sum")
    flower_environment(Path.cwd())
    if not verbose:
        quiet_flower()
    cfg = ExperimentConfig(out=out, clinics=clinics, patients_per_clinic=patients_per_clinic, rounds=rounds, dp=dp,
                           epsilon=epsilon, strategy=strategy,
                           seed=seed, sites=sites, task=task, local_epochs=local_epochs or base.local_epochs,
                           models=models, boosting=boosting, xgb_rounds=xgb_rounds or base.xgb_rounds,
                           secure_sum=secure_sum, ann_secure_sum=ann_secure_sum, compare=compare,
                           deploy_cycles=deploy_cycles,
                           deploy_patients=deploy_patients,
                           explore=explore, policy_model=policy_model, policy_reference=policy_reference,
                           malicious_sites=base.malicious_sites if malicious_sites is None else malicious_sites,
                           trim_fraction=base.trim_fraction if trim_fraction is None else trim_fraction,
                           clip_norm=base.clip_norm if clip_norm is None else clip_norm,
                           clip_median_factor=base.clip_median_factor if clip_median_factor is None
                           else clip_median_factor, attacks=list(attack or []),
                           personalise=personalise, policy=policy, ray_address=ray_address,
                           supernode_cpus=supernode_cpus, **central)
    if resume is not None:
        try:
            cfg = ExperimentConfig.resumed(resume)
        except ExperimentError as err:
            raise typer.BadParameter(str(err), param_hint="--resume") from err
        out, rounds = cfg.out, cfg.rounds
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("sites", total=rounds)

        def on_phase(name: str) -> None:
            progress.update(bar, description=name)

        def on_round(server_round: int) -> None:
            progress.update(bar, completed=server_round, description=f"federation round {server_round}/{rounds}")

        stopped = (f"fednano simulate: stopped by SIGTERM (Ray and every process of the run stopped); the last "
                   f"checkpoint is kept: continue with fednano simulate --resume {cfg.out}")
        try:
            with stop_on_sigterm(stopped):
                results = run_experiment(cfg, on_round=on_round, on_phase=on_phase)
        except ExperimentError as err:
            console.print(f"[red]error[/red]: {err}")
            raise typer.Exit(2) from err
    _print_summary(console, results, out)


@app.command(context_settings={"allow_extra_args": True})
def analytics(
    ctx: typer.Context,
    clinics: int | None = typer.Option(None, "--clinics", min=2, max=MAX_CLINICS,
                                        help="Simulated clinics (default 5)."),
    sites: list[Path] | None = typer.Option(None, "--sites", help="Site folders or CSV files: --sites A B C."),
    task: Path | None = typer.Option(None, "--task", help="task.toml for --sites holding a generic task."),
    dp: bool = typer.Option(False, "--dp/--no-dp", help="Simulated sites add Gaussian noise to every aggregate."),
    epsilon: float = typer.Option(1.0, "--epsilon", min=0.01, max=SITE_MAX_EPSILON,
                                  help="ε budget of simulated DP sites, all of it for this run (your own sites "
                                       "grant analytics their [privacy.shares] analytics)."),
    k: int = typer.Option(3, "--k", min=1, max=20, help="k-means clusters."),
    seed: int = typer.Option(0, "--seed", help="World seed and initial-centroid phase."),
    out: Path = typer.Option(Path("runs/analytics"), "--out", help="Output folder."),
    analyses: str = typer.Option("describe,regression,anova,pca,kmeans", "--analyses",
                                 help="Analyses to run, comma-separated (kmeans brings pca); a DP site's ε for the "
                                      "run is split over them, the others spend nothing."),
    secure_sum: str = typer.Option("pairwise", "--secure-sum",
                                   help="How the sites' sums are added: pairwise (default; masks, a site lost "
                                        "fails its query) | recovering (dropout recovery, 4 exchanges a query) "
                                        "| off. Masked, describe reports no min / max (not sums)."),
) -> None:
    """The seed paper's statistics (describe, regression, ANOVA, PCA, k-means) across sites, from aggregates."""
    from server.analytics_plan import chosen_analyses
    from shared.protocol.hist import SECURE_SUM_MODES
    from simulation.analytics_run import run_analytics
    from simulation.experiment import flower_environment

    sites = _site_paths(ctx, sites)
    if clinics is not None and sites:
        raise typer.BadParameter("give --clinics or --sites, not both", param_hint="--clinics")
    try:
        chosen_analyses(analyses)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--analyses") from err
    if secure_sum not in SECURE_SUM_MODES:
        raise typer.BadParameter(f"expected one of {', '.join(SECURE_SUM_MODES)}", param_hint="--secure-sum")
    flower_environment(Path.cwd())
    from simulation.experiment import ExperimentError

    try:
        run_analytics(out, clinics=None if sites else (clinics or 5), sites=sites or None, task=task, dp=dp, k=k,
                      seed=seed, epsilon=epsilon, analyses=analyses, secure_sum=secure_sum)
    except ExperimentError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"wrote {out / 'analytics.json'}, {out / 'analytics.md'}, CSV tables and {out / 'pca_clusters.png'}")


paper_app = typer.Typer(help="Re-run published results on the packaged real data.", no_args_is_help=True)
app.add_typer(paper_app, name="paper")


@paper_app.command("liposome")
def paper_liposome(
    out: Path = typer.Option(Path("runs/paper_liposome"), "--out", help="Output folder."),
    rounds: int = typer.Option(20, "--rounds", min=1, help="Federated ANN rounds per fold."),
    xgb_rounds: int = typer.Option(10, "--xgb-rounds", min=1, help="Federated bagging rounds per fold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the site splits and models."),
    boosting: str = typer.Option("bagging,cyclic,hist", "--boosting",
                                 help="Federated XGBoost modes to run, comma-separated: bagging, cyclic, hist."),
) -> None:
    """Yanes et al. 2025 (liposome release classes): the paper's protocol pooled, then federated on its folds."""
    from simulation.experiment import flower_environment, quiet_flower
    from simulation.paper_liposome import run_paper_liposome

    modes = tuple(m.strip() for m in boosting.split(",") if m.strip())
    if not modes or set(modes) - {"bagging", "cyclic", "hist"}:
        raise typer.BadParameter("expected a comma-separated list of bagging, cyclic, hist", param_hint="--boosting")
    flower_environment(Path.cwd())
    quiet_flower()
    run_paper_liposome(out, rounds=rounds, xgb_rounds=xgb_rounds, seed=seed, boosting_modes=modes)


@app.command()
def provision(
    federation: str = typer.Option(..., "--federation", help="Federation name: the SuperLink connection for flwr."),
    sites: str = typer.Option(..., "--sites", help="Site names, comma-separated: a,b,c (letters, digits, - and _)."),
    out: Path = typer.Option(..., "--out", help="Kit folder: writes coordinator/ and sites/<site>/ into it."),
    san: list[str] | None = typer.Option(
        None, "--san", help="A name the SuperLink is reached by (repeat it); default localhost and 127.0.0.1. "
                            "127.0.0.1 is always included."),
    days: int = typer.Option(365, "--days", help="Validity of the CA and server certificates: 1 to 3650 days."),
    add_sites: bool = typer.Option(
        False, "--add-sites", help="Keep the kit's CA, server and coordinator keys; add kits for new sites only."),
) -> None:
    """Make a federation's TLS certificates, SuperNode keys and policy-signing key; print the next commands."""
    from server.provision import DEFAULT_SANS, ProvisionError
    from server.provision import provision as make_kit

    try:
        result = make_kit(federation, [s.strip() for s in sites.split(",")], out, server_sans=san or DEFAULT_SANS,
                          days=days, add_sites=add_sites)
    except (ProvisionError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"wrote {len(result.written)} files under {result.out}")
    if result.skipped:
        typer.echo(f"already provisioned, left as they are: {', '.join(result.skipped)}")
    typer.echo("\n".join(result.next_commands()))


@app.command()
def status(
    federation: str | None = typer.Argument(None, help="Federation in FLWR_HOME's config.toml: list its runs."),
    record: list[Path] | None = typer.Option(
        None, "--record", help="A run's out-dir or its federation.json (repeat it): rounds, sites, ε spent."),
    run_id: int | None = typer.Option(None, "--run-id", help="Only this run of the federation."),
    width: int | None = typer.Option(None, "--width", min=40, help="Table width (default: the terminal's)."),
) -> None:
    """Show a federation's runs (Flower's `flwr ls`) and, from run records, rounds, per-site participation, ε."""
    from rich.console import Console

    from server import status as view

    if federation is None and not record:
        raise typer.BadParameter("name a federation, or give --record with a run's out-dir", param_hint="FEDERATION")
    console = Console(width=width)
    failed = False
    if federation is not None:
        try:
            console.print(view.runs_table(view.flower_runs(federation, run_id), federation))
        except view.StatusError as err:
            console.print(f"[red]error[/red]: {err}")
            failed = True
    for path in record or []:
        try:
            run = view.read_record(path)
        except view.StatusError as err:
            console.print(f"[red]error[/red]: {err}")
            failed = True
            continue
        label = f"{path} (run {view.record_run_id(run) or 'id not recorded'})"
        console.print(view.rounds_table(run, f"rounds of {label}"), view.sites_table(run, f"sites of {label}"))
        if (central := view.central_dp_table(run, f"central DP of {label}")) is not None:
            console.print(central)
        for line in view.rejected_lines(run):
            console.print(f"[red]{line}[/red]")
    raise typer.Exit(1 if failed else 0)


@app.command()
def dashboard(
    runs_dir: Path = typer.Argument(..., exists=True, file_okay=False,
                                    help="Folder of runs: fednano simulate --out folders, ServerApp out-dirs."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8050, "--port", min=1, max=65535, help="TCP port."),
    token: str | None = typer.Option(None, "--token", envvar="FEDNANO_WEB_TOKEN", show_default=False,
                                     help="Access token every request must present (needed off 127.0.0.1)."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="TLS certificate, e.g. the kit's "
                                                                  "coordinator/server.pem (needed off 127.0.0.1)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="Its private key, e.g. coordinator/server.key."),
) -> None:
    """Serve the federation dashboard: every run under RUNS_DIR, its rounds, sites, ε, curves and policy versions
    (read-only; a run in progress refreshes itself)."""
    from server.dashboard import serve_dashboard
    from shared.web.access import TLSFiles, WebAccessError, check_binding

    try:
        if (tls_cert is None) != (tls_key is None):
            raise WebAccessError("give both --tls-cert and --tls-key, or neither")
        tls = TLSFiles(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        check_binding(host, token, tls)
        scheme = "https" if tls else "http"
        typer.echo(f"dashboard of the runs under {runs_dir}: {scheme}://{host}:{port}/"
                   + (" (open it with ?token=<token> once)" if token else ""))
        serve_dashboard(runs_dir, host=host, port=port, token=token, tls=tls)
    except WebAccessError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


POLICY_HELP = ("A signed policy bundle folder. With --site (or a site store found in ./.fednano/policy) it must be "
               "the version the site installed: an older one is refused.")
SITE_HELP = ("A site's data folder: serve the policy its store (<site>/.fednano/policy) holds, verified against "
             "--trust.")
TRUST_HELP = "The coordinator's public key policy_signing.pub from this site's kit."


@app.command()
def recommend(
    patient: Path = typer.Option(..., "--patient", help="Patient record JSON (see examples/patient.json)."),
    trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
    site: Path | None = typer.Option(None, "--site", help=SITE_HELP),
    policy: Path | None = typer.Option(None, "--policy", help=POLICY_HELP),
    vitals: Path | None = typer.Option(
        None, "--vitals", help="The last cycle's daily wearable readings (CSV, columns of vitals.csv); their "
                               "summary replaces the record's wearable_summary."),
    fhir: bool = typer.Option(False, "--fhir", help="Print a FHIR R4 MedicationRequest instead."),
) -> None:
    """Recommend formulation, dose and interval for one patient from the site's verified policy; print JSON."""
    import json

    from client.decision_log import DecisionLog
    from client.recommender import RecommenderInputError, policy_to_serve, read_patient, with_vitals
    from client.recommender import recommend as recommend_one

    try:
        loaded = policy_to_serve(policy, trust, site)
        gate = getattr(loaded, "site_gate", None)
        if gate is not None:
            typer.echo(f"site gate: {gate.describe()}", err=True)
        record = read_patient(patient)
        if vitals is not None:
            record, warnings = with_vitals(record, vitals)
            for line in warnings:
                typer.echo(f"warning: {line}", err=True)
        log = DecisionLog(site) if site is not None else None
        result = recommend_one(loaded, record, fhir=fhir, source=str(patient), log=log)
    except RecommenderInputError as err:
        typer.echo("\n".join(f"error: {line}" for line in err.lines), err=True)
        raise typer.Exit(1) from err
    if result.get("resourceType") == "OperationOutcome":
        typer.echo(f"no MedicationRequest: {result['issue'][0]['diagnostics']}", err=True)
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))


@app.command()
def serve(
    trust: Path = typer.Option(..., "--trust", help=TRUST_HELP),
    site: Path | None = typer.Option(None, "--site", help=SITE_HELP),
    policy: Path | None = typer.Option(None, "--policy", help=POLICY_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    token: str | None = typer.Option(None, "--token", envvar="FEDNANO_WEB_TOKEN", show_envvar=True,
                                     help="Access token every request must present (Authorization: Bearer, or "
                                          "?token= once in the browser); required off 127.0.0.1."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="TLS certificate (PEM), e.g. the provisioning "
                                                                  "kit's; required off 127.0.0.1."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="The TLS certificate's private key (PEM)."),
) -> None:
    """Serve the recommender over HTTP: the clinician's page at /, the JSON API (OpenAPI at /docs); refuses to
    start if the policy is not the site's, or off 127.0.0.1 without an access token and TLS."""
    from client.decision_log import DecisionLog
    from client.recommender import InstalledPolicy, RecommenderInputError, followed_policy
    from client.service import serve as serve_app
    from shared.web.access import TLSFiles, WebAccessError, check_binding

    try:
        if (tls_cert is None) != (tls_key is None):
            raise WebAccessError("give both --tls-cert and --tls-key, or neither")
        tls = TLSFiles(tls_cert, tls_key) if tls_cert is not None else None
        check_binding(host, token, tls)
    except WebAccessError as err:
        typer.echo(f"error: {err}", err=True)
        typer.echo("error: not starting the recommender service", err=True)
        raise typer.Exit(1) from err
    try:
        served = followed_policy(policy, trust, site)
    except RecommenderInputError as err:
        typer.echo("\n".join(f"error: {line}" for line in err.lines), err=True)
        typer.echo("error: not starting the recommender service", err=True)
        raise typer.Exit(1) from err
    loaded = served.current() if isinstance(served, InstalledPolicy) else served
    version = loaded.manifest.version if loaded.manifest is not None else "?"
    followed = f"; following the site's store {served.store.root}" if isinstance(served, InstalledPolicy) else ""
    gate = getattr(loaded, "site_gate", None)
    if gate is not None:
        typer.echo(f"site gate: {gate.describe()}")
    scheme = "https" if tls is not None else "http"
    typer.echo(f"policy version {version} verified{followed}; serving on {scheme}://{host}:{port} (the clinician's "
               f"page at /, OpenAPI at /docs{'; access token required' if token else ''})")
    if site is not None:
        typer.echo(f"recording each dose recommended in {site / 'decisions.csv'} (the site's decision log)")
    serve_app(served, host=host, port=port, log=DecisionLog(site) if site is not None else None, token=token,
              tls=tls)


@app.command("site-worker")
def site_worker(
    socket_path: Path = typer.Option(..., "--socket", help="The Unix socket to listen on; its folder must be this "
                                                           "user's only (it is created with mode 0700)."),
) -> None:
    """Keep the site's ClientApp loaded for its SuperNode: start it beside `flower-supernode` and give the
    SuperNode --node-config 'site-worker="SOCKET"'; each message then skips the ClientApp's imports."""
    import logging

    from client.site_worker import UnsafeSocketFolder, preload, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        seconds = preload()
        typer.echo(f"site worker: loaded {', '.join(seconds)} in {sum(seconds.values()):.1f} s; listening on "
                   f"{socket_path}")
        from client.app import app as client_app

        served = serve(socket_path, app=client_app)
    except UnsafeSocketFolder as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"site worker: stopped after {served} messages")


ledger_app = typer.Typer(no_args_is_help=True, help="A site's privacy ledger: what it has spent, and starting a new "
                                                     "budget on purpose.")
app.add_typer(ledger_app, name="ledger")

LEDGER_TARGET_HELP = "A site folder (its ledger is .fednano/privacy_ledger.json), or a ledger file (*.json)."
STATE_DIR_HELP = ("fednano's state folder holding the ledger heads "
                  "(default $FEDNANO_STATE_DIR, else $XDG_STATE_HOME/fednano).")


@ledger_app.command("status")
def ledger_status(
    target: Path = typer.Argument(..., help=LEDGER_TARGET_HELP),
    epsilon: float | None = typer.Option(None, "--epsilon", help="ε budget (default: site.toml's [privacy])."),
    delta: float | None = typer.Option(None, "--delta", help="δ (default: site.toml's [privacy])."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
) -> None:
    """ε spent and left, entries, and whether the ledger matches its hash chain and its head; exit 1 if not."""
    from client.ledger import LedgerError, PrivacyLedger

    path, site = _ledger_target(target)
    budget, site_delta = _ledger_budget(site, epsilon, delta)
    ledger = PrivacyLedger(path, budget, site_delta, state_dir=state_dir)
    typer.echo(f"site     {site}\nledger   {path}\nhead     {ledger.head_file}")
    try:
        spent, head = ledger.spent(), ledger.head()
    except LedgerError as err:
        typer.echo(f"chain    REFUSED: {err}")
        raise typer.Exit(1) from err
    if head is None:
        typer.echo("         no ledger yet: this site has recorded no DP training")
    reset = ledger.reset
    typer.echo(f"budget   {ledger.budget_number}, " + (f"started {reset['utc']} by {reset['by']}: {reset['reason']}"
                                                       if reset else "the site's first"))
    typer.echo(f"spent    ε={spent:.4f} of {budget:g} at δ={site_delta:g}, {ledger.remaining():.4f} left")
    steps = sum(entry["steps"] for entry in ledger.entries)
    phases = ", ".join(sorted({entry["phase"] or "unlabelled" for entry in ledger.entries})) or "none"
    typer.echo(f"entries  {len(ledger.entries)}, {steps} steps; phases: {phases}")
    budgets = sorted({entry["epsilon_budget"] for entry in ledger.entries})
    if len(budgets) > 1:
        typer.echo(f"         the budget in force changed between entries: {', '.join(f'{b:g}' for b in budgets)}")
    if head is not None:
        typer.echo(f"chain    OK: hash chain intact, head matches ({_count(head.entries, 'entry', 'entries')}, "
                   f"{head.head[:12]}…)")
    for past in head.resets if head else ():
        typer.echo(f"reset    {past['utc']} by {past['by']}: {past['reason']}; {_old_budget(past)}")


@ledger_app.command("new-budget")
def ledger_new_budget(
    target: Path = typer.Argument(..., help=LEDGER_TARGET_HELP),
    reason: str = typer.Option(..., "--reason", help="Why this site starts a new privacy budget (kept in the log)."),
    by: str | None = typer.Option(None, "--by", help="Who asks for it (default: user@host)."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="ε budget (default: site.toml's [privacy])."),
    delta: float | None = typer.Option(None, "--delta", help="δ of the new budget (default: site.toml's [privacy])."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help=STATE_DIR_HELP),
) -> None:
    """Start a site's privacy budget afresh, on purpose: the old ledger is archived (never deleted), the reset
    logged (who, when, why) in the new ledger and the head store, and ε spent starts again from 0."""
    from client.ledger import PrivacyLedger

    path, site = _ledger_target(target)
    budget, site_delta = _ledger_budget(site, epsilon, delta)
    if not reason.strip():
        raise typer.BadParameter("say why this site starts a new budget", param_hint="--reason")
    ledger = PrivacyLedger.start_new_budget(path, budget, site_delta, reason, by=by, state_dir=state_dir)
    reset = ledger.reset
    typer.echo(f"budget {ledger.budget_number} started {reset['utc']} by {reset['by']}: {reset['reason']}")
    typer.echo(_old_budget(reset))
    typer.echo(f"ε spent 0 of {budget:g} at δ={site_delta:g}; the reset is logged in {path} and {ledger.head_file}")


def _old_budget(reset: dict) -> str:
    """What a reset record says about the budget it ended: the ledger's state, its ε, its head, the archive."""
    old = reset["previous"]
    ledger = f"old ledger {old.get('ledger')}" + (f", ε={old['epsilon']:.4f} spent" if "epsilon" in old else "")
    head = old.get("head")
    said = (f"its head said ε={head['epsilon']:.4f} after {_count(head['entries'], 'entry', 'entries')}"
            if isinstance(head, dict)
            else f"its head: {head}" if head else "no head")
    archived = f"archived to {reset['archived']}" if reset["archived"] else "no file to archive"
    return f"{ledger}; {said}; {archived}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _ledger_target(target: Path) -> tuple[Path, Path]:
    """(ledger file, site folder), absolute, for ``fednano ledger``'s argument."""
    from client.ledger import SITE_LEDGER_FILE

    target = target.absolute()
    if target.suffix == ".json":
        site = target.parent.parent if target.parent.name == SITE_LEDGER_FILE.parent.name else target.parent
        return target, site
    if not target.is_dir():
        raise typer.BadParameter(f"{target} is no folder (a site folder) and no .json file (a ledger)",
                                 param_hint="TARGET")
    return target / SITE_LEDGER_FILE, target


def _ledger_budget(site: Path, epsilon: float | None, delta: float | None) -> tuple[float, float]:
    """(ε, δ) from the options, else from the site's site.toml ``[privacy]``."""
    from shared.schema import SITE_FILE
    from shared.validation import read_site_config

    privacy = {}
    if (site / SITE_FILE).is_file():
        config, _ = read_site_config(site / SITE_FILE)
        privacy = config.get("privacy", {}) if isinstance(config.get("privacy"), dict) else {}
    epsilon = epsilon if epsilon is not None else privacy.get("epsilon")
    delta = delta if delta is not None else privacy.get("delta")
    for name, value, low, high in (("--epsilon", epsilon, 0, float("inf")), ("--delta", delta, 0, 1)):
        if value is None:
            raise typer.BadParameter(f"no [privacy] {name[2:]} in {site / SITE_FILE}: give {name}", param_hint=name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low < value < high:
            raise typer.BadParameter(f"expected a number in ({low:g}, {high:g}), got {value!r}", param_hint=name)
    return float(epsilon), float(delta)


def _central_dp_options(base, strategy: str, mechanism: str | None, noise: float | None, clip: float | None,
                        delta: float | None, accountant: str | None) -> dict:
    """The ``central_*`` fields of ``ExperimentConfig`` from ``--central-*`` (unset: the settings' defaults);
    ``BadParameter`` naming the option for a mechanism, strategy or value central DP cannot take."""
    from server.settings import CENTRAL_ACCOUNTANTS
    from strategies.central_dp import MECHANISMS, CentralDPParameters, central_dp_problem

    options = {"central_dp": mechanism or "",
               "central_noise_multiplier": base.central_noise_multiplier if noise is None else noise,
               "central_clip": base.central_clip if clip is None else clip,
               "central_delta": base.central_delta if delta is None else delta,
               "central_accountant": accountant or base.central_accountant}
    given = [name for name, value in (("--central-noise-multiplier", noise), ("--central-clip", clip),
                                      ("--central-delta", delta), ("--central-accountant", accountant))
             if value is not None]
    if not mechanism:
        if given:
            raise typer.BadParameter(f"{', '.join(given)} without --central-dp: add --central-dp fixed or adaptive",
                                     param_hint="--central-dp")
        return options
    if mechanism not in MECHANISMS:
        raise typer.BadParameter(f"expected one of {', '.join(MECHANISMS)}", param_hint="--central-dp")
    if options["central_accountant"] not in CENTRAL_ACCOUNTANTS:
        raise typer.BadParameter(f"expected one of {', '.join(CENTRAL_ACCOUNTANTS)}", param_hint="--central-accountant")
    if not 0 < options["central_delta"] < 1:
        raise typer.BadParameter("expected a number in (0, 1)", param_hint="--central-delta")
    try:
        CentralDPParameters(mechanism, options["central_noise_multiplier"], options["central_clip"])
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--central-dp") from err
    if problem := central_dp_problem(strategy):
        raise typer.BadParameter(problem, param_hint="--strategy")
    return options


def _site_paths(ctx: typer.Context, sites: list[Path] | None) -> list[Path]:
    """``--sites A B C`` (or repeated ``--sites``): every path must exist, and a federation needs two."""
    if ctx.args and not sites:
        raise typer.BadParameter(f"unexpected arguments {' '.join(ctx.args)}", param_hint="--sites")
    paths = [*(sites or []), *(Path(a) for a in ctx.args)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise typer.BadParameter(f"no such file or folder: {', '.join(missing)}", param_hint="--sites")
    if len(paths) == 1:
        raise typer.BadParameter("a federation needs at least two sites", param_hint="--sites")
    return paths


def _print_summary(console, results: dict, out: Path) -> None:
    from rich.table import Table

    for family, models in results["models"].items():
        if "federated" not in models:
            continue  # the seed comparison's models: see report.md
        table = Table(title=f"{family}, all test sets (see report.md for per-site figures)")
        table.add_column("outcome")
        table.add_column("metric")
        for model in models:
            table.add_column(model, justify="right")
        for name, kind in results["task"]["outcomes"]:
            metric = "r2" if kind == "regression" else "auc"
            cells = [models[m]["overall"][name].get(metric) for m in models]
            table.add_row(name, metric, *["–" if v is None else f"{v:.3f}" for v in cells])
        console.print(table)
    for site, p in sorted(results["privacy"].items()):
        phases = ", ".join(f"{phase} {v['epsilon_after']:.2f}" for phase, v in p["phases"].items()
                           if v["epsilon_after"] is not None)
        refused = f"; refused: {', '.join(p['refused'])}" if p["refused"] else ""
        console.print(f"{site}: ε spent {p['epsilon']:.2f} of {p['budget']:g} (δ={p['delta']:g}; after each "
                      f"phase: {phases or 'none'}{refused})")
    _print_central_dp(console, results.get("central_dp"))
    for a in results.get("attacks", []):
        factor = f" ×{a['factor']:g}" if a["factor"] else ""
        console.print(f"[yellow]attacking site[/yellow] {a['site']}: {a['kind']}{factor}")
    for site, errors in results["rejected"].items():
        console.print(f"[red]{site} left out[/red]: {'; '.join(errors)}")
    _print_policy(console, results.get("policy"))
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")


def _print_central_dp(console, central: dict | None) -> None:
    if not central:
        return
    eps = "∞ (no noise)" if central["epsilon"] is None else f"{central['epsilon']:.2f}"
    both = (f"; sites also under their own DP-SGD (ε above, per row, not added): {', '.join(central['local_dp_sites'])}"
            if central["local_dp_sites"] else "; no site under its own DP")
    console.print(f"central DP ({central['mechanism']} clipping) of the ANN's global models: ε = {eps} at "
                  f"δ = {central['delta']:g} per site ({central['accountant'].upper()}, {central['rounds']} rounds, "
                  f"noise multiplier {central['noise_multiplier']:g}, sample rate {central['sample_rate']:g}){both}; "
                  f"not covered: {', '.join(central['not_covered']) or 'nothing else'}")


def _print_policy(console, policy: dict | None) -> None:
    from rich.table import Table

    from simulation.report import policy_rows

    if not policy:
        return
    console.print(f"release gate: {policy['gate']['reason']}")
    if policy["shipped"]:
        held = sum(s["installed"] for s in policy["sites"].values())
        console.print(f"policy v{policy['version']}: {policy['bundle']} (trust key {policy['trust_key']}); "
                      f"installed at {held} of {len(policy['sites'])} sites")
    else:
        console.print(f"policy not shipped: the candidate stays in {policy['candidate']}")
    if not policy.get("evaluation"):
        return
    table = Table(title=f"dosing policies on {policy['evaluation']['patients_per_site']} new patients per site "
                        "(true outcomes from the simulator)")
    for column in ("policy", "value", "value/oracle", "response", "toxicity ≥ 3"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    for name, m in policy_rows(policy["evaluation"]):
        table.add_row(name, f"{m['value']:.3f}", f"{m['value_ratio']:.3f}", _rate(m["response_rate"]),
                      _rate(m["toxicity_rate"]))
    console.print(table)


def _rate(value) -> str:
    return "-" if value is None else f"{value:.1%}"


audit_app = typer.Typer(no_args_is_help=True, help="Empirical privacy audits of a finished simulated run.")
app.add_typer(audit_app, name="audit")


@audit_app.command("membership")
def audit_membership(
    out: Path = typer.Argument(..., help="The output folder of a `fednano simulate` run."),
    references: int = typer.Option(4, "--references", min=0, max=64,
                                   help="Reference models per model family, trained on fresh simulated patients "
                                        "(0: the uncalibrated loss attack only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the member sample and the reference models' patients."),
    non_members: str = typer.Option("test", "--non-members",
                                    help="Non-members: 'test' (the sites' test patients; as many training "
                                         "patients as members) or 'fresh' (those plus fresh simulated patients "
                                         "of the same clinics, so every training patient is a member)."),
) -> None:
    """Membership inference on the released models: attack AUC and TPR at 1 % FPR per site and overall, into
    OUT/audit/membership.json, OUT/audit/membership.md and the run's report.md."""
    from server.run_record import RecordError
    from shared.artifacts import ArtifactsError
    from simulation.membership_audit import AUDIT_DIR, AUDIT_FILE, AuditError, run_membership_audit

    try:
        audit = run_membership_audit(out, references=references, seed=seed, non_members=non_members,
                                     say=lambda s: typer.echo(s, err=True))
    except (AuditError, ArtifactsError, RecordError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    head = audit["headline"]
    typer.echo(f"{head['attack']} attack on the {head['model']} ({audit['reference_models']} reference models):")
    for site, m in [*audit["per_site"].items(), ("overall", audit["overall"])]:
        typer.echo(f"  {site:<12} AUC {_number(m['auc'])} ± {_number(m.get('auc_se_clustered', m['auc_se']))}  "
                   f"TPR@1%FPR {_number(m['tpr_at_1pct_fpr'])}  "
                   f"({m['members']} members, {m['non_members']} non-members)")
    typer.echo(f"wrote {out / AUDIT_DIR / AUDIT_FILE}")


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
