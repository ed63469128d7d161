"""One source of run defaults (server.settings): pyproject's run config, the experiment runner and the CLI
agree with it."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from server.settings import DEFAULTS, RUN_CONFIG_KEYS, RunSettings, parse_hidden, parse_models
from simulation.experiment import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyprojects_run_config_declares_the_settings_own_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = DEFAULTS.to_run_config()
    assert set(declared) <= set(RUN_CONFIG_KEYS)
    for key, value in declared.items():
        if key == "min-nodes":
            continue  # a deployment waits for one node by default; simulate waits for every site it made
        assert value == defaults[key], key


def test_the_experiment_runners_defaults_are_the_settings():
    cfg = ExperimentConfig()
    settings = cfg.run_settings(n_sites=5, signing_key=None)
    for field in ("num_server_rounds", "strategy", "local_epochs", "batch_size", "lr", "hidden", "models",
                  "boosting", "xgb_rounds", "fqi_iterations", "seed", "split_seed", "release_gate"):
        assert getattr(settings, field) == getattr(DEFAULTS, field), field
    assert settings.min_nodes == 5 and settings.out_dir == str(cfg.out / "federated")


def test_every_simulate_option_reaches_the_run_settings():
    cfg = ExperimentConfig(rounds=3, strategy="fedprox", seed=9, local_epochs=2, batch_size=8, lr=0.1,
                           hidden="16,8", models="xgboost", boosting="hist", xgb_rounds=4, fqi_iterations=0,
                           secure_sum="recovering")
    settings = cfg.run_settings(n_sites=2, signing_key=Path("k"))
    assert (settings.num_server_rounds, settings.strategy, settings.seed, settings.split_seed) == (3, "fedprox", 9, 9)
    assert (settings.local_epochs, settings.batch_size, settings.lr, settings.hidden_sizes) == (2, 8, 0.1, (16, 8))
    assert (settings.model_names, settings.boosting, settings.xgb_rounds) == (("xgboost",), "hist", 4)
    assert settings.signing_key == "k" and settings.fqi_iterations == 0 and settings.secure_sum == "recovering"
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


def test_the_cli_leaves_unset_options_to_the_settings():
    from typer.main import get_command

    from fednano.cli import app

    simulate = get_command(app).commands["simulate"]
    unset = {p.name: p.default for p in simulate.params}
    for option in ("rounds", "strategy", "local_epochs", "models", "boosting", "xgb_rounds", "malicious_sites",
                   "trim_fraction", "clip_norm", "secure_sum"):
        assert unset[option] is None, option  # filled from ExperimentConfig(), i.e. server/settings.py


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="hidden"):
        parse_hidden("64,x")
    with pytest.raises(ValueError, match="models"):
        parse_models("ann,forest")
    with pytest.raises(ValueError, match="boosting"):
        dataclasses.replace(DEFAULTS, boosting="random")
    with pytest.raises(ValueError, match="secure-sum: expected one of off, pairwise, recovering"):
        dataclasses.replace(DEFAULTS, secure_sum="shamir")


def test_the_hist_phases_secure_sum_is_a_mode_pairwise_by_default_and_true_false_still_mean_on_off():
    from server.hist_phase import HistSettings

    assert DEFAULTS.secure_sum == "pairwise" == HistSettings().secure_sum
    assert HistSettings(secure_sum=True).secure_sum == "pairwise" and HistSettings(secure_sum=False).secure_sum == "off"
    assert HistSettings.from_run_settings(dataclasses.replace(DEFAULTS, secure_sum="recovering")).secure_sum == \
        "recovering"
    assert RunSettings.from_run_config({"secure-sum": "off"}).secure_sum == "off"
    with pytest.raises(ValueError, match="secure-sum"):
        HistSettings(secure_sum="on")


def test_the_clis_epsilon_limit_is_the_site_contracts():
    from fednano.cli import SITE_MAX_EPSILON
    from shared.validation.site_config import MAX_EPSILON

    assert SITE_MAX_EPSILON == MAX_EPSILON


def test_robustness_options_reach_the_run_settings_and_derive_when_unset():
    from strategies.robust import RobustParameters

    settings = ExperimentConfig(strategy="fedtrimmedavg", malicious_sites=2, trim_fraction=0.3,
                                clip_norm=1.5).run_settings(n_sites=10, signing_key=None)
    assert (settings.malicious_sites, settings.trim_fraction, settings.clip_norm) == (2, 0.3, 1.5)
    assert settings.robust_parameters(10) == RobustParameters(2, 0.3)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    assert DEFAULTS.robust_parameters(10) == RobustParameters(1, 0.15) and DEFAULTS.clip_norm == 0.0
