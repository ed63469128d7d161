"""Local training: learns, DP-SGD accounts what it spends, FedProx pulls towards the global model."""

import numpy as np
import pytest
import torch

from client.ledger import PrivacyLedger, calibrate_noise
from client.split import encode, split_site
from client.training import DPConfig, TrainConfig, evaluate, sample_rate, train
from shared import metrics
from shared.ann import build_model
from shared.encoding import fit_local
from shared.task import NANOPARTICLE_TASK
from shared.validation import load_site
from simulation.clinics import generate_sites


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("sites")
    generate_sites(1, seed=5, out=out, patients_per_clinic=300)
    data = load_site(out / "clinic_00")
    parts = split_site(data.episodes, NANOPARTICLE_TASK, seed=0)
    encoder = fit_local(parts["train"], NANOPARTICLE_TASK)
    return encoder, encode(encoder, parts["train"]), encode(encoder, parts["test"])


def _auc(model, encoder, test, outcome="response"):
    return metrics.binary_metrics(evaluate(model, encoder, test)[outcome])["auc"]


def test_training_learns_response_well_above_chance(site):
    encoder, train_split, test_split = site
    model = build_model(encoder, NANOPARTICLE_TASK, (64, 32), seed=0)
    before = _auc(model, encoder, test_split)
    train(model, train_split, TrainConfig(epochs=8, seed=0))
    after = _auc(model, encoder, test_split)
    assert after > 0.75 and after > before + 0.1


def test_dp_training_history_matches_the_steps_taken_and_the_ledger_spends_it(site, tmp_path):
    encoder, train_split, _ = site
    model = build_model(encoder, NANOPARTICLE_TASK, (64, 32), seed=0)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", epsilon_budget=3.0, delta=1e-5)
    result = train(model, train_split, TrainConfig(epochs=2), DPConfig(noise_multiplier=1.2), history=ledger.history)
    q = sample_rate(len(train_split), 32)
    assert result.history == [(1.2, pytest.approx(q), result.steps)]
    accountant = ledger.accountant()
    accountant.history = result.history
    ledger.record_from_accountant(accountant, run_id="r", server_round=1)
    fresh = PrivacyLedger("unused.json", 3.0, 1e-5)
    assert ledger.spent() == pytest.approx(fresh.epsilon_after(1.2, q, result.steps))
    assert 0 < ledger.spent() < 3.0


def test_noise_calibrated_for_a_run_spends_at_most_the_budget(site):
    _, train_split, _ = site
    q, steps = sample_rate(len(train_split), 32), 10 * int(np.ceil(len(train_split) / 32))
    sigma = calibrate_noise(3.0, 1e-5, q, steps)
    ledger = PrivacyLedger("unused.json", 3.0, 1e-5)
    assert ledger.epsilon_after(sigma, q, steps) <= 3.0 + 1e-6
    assert ledger.epsilon_after(0.95 * sigma, q, steps) > 3.0


def test_dp_costs_accuracy_but_still_learns(site):
    encoder, train_split, test_split = site
    plain = build_model(encoder, NANOPARTICLE_TASK, (64, 32), seed=0)
    private = build_model(encoder, NANOPARTICLE_TASK, (64, 32), seed=0)
    train(plain, train_split, TrainConfig(epochs=8))
    train(private, train_split, TrainConfig(epochs=8), DPConfig(noise_multiplier=1.0))
    assert _auc(private, encoder, test_split) > 0.6
    assert _auc(private, encoder, test_split) < _auc(plain, encoder, test_split) + 0.02


def test_proximal_term_keeps_local_weights_closer_to_the_global_model(site):
    encoder, train_split, _ = site
    start = build_model(encoder, NANOPARTICLE_TASK, (64, 32), seed=0)
    anchor = [p.detach().clone() for p in start.parameters()]

    def drift(mu):
        model = build_model(encoder, NANOPARTICLE_TASK, (64, 32), seed=0)
        train(model, train_split, TrainConfig(epochs=3, proximal_mu=mu))
        return sum(float(torch.sum((p - a) ** 2)) for p, a in zip(model.parameters(), anchor, strict=True))

    assert drift(5.0) < 0.7 * drift(0.0)


@pytest.mark.parametrize(("rows", "batch", "epochs", "seed"), [(84, 32, 3, 7), (64, 32, 2, 0), (5, 32, 2, 3)])
def test_shuffled_batches_are_the_loaders_batches_epoch_after_epoch(rows, batch, epochs, seed):
    from torch.utils.data import DataLoader, TensorDataset

    from client.training import ShuffledBatches

    tensors = [torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3), torch.arange(rows, dtype=torch.float32)]
    size = min(batch, rows)
    loader = DataLoader(TensorDataset(*tensors), batch_size=size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = ShuffledBatches(tensors, size, seed)
    assert len(batches) == len(loader)
    for _ in range(epochs):  # the generator's draws line up across epochs, not only in the first
        ours, theirs = list(batches), list(loader)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)


def test_training_without_dp_gives_the_model_the_loader_gave(site, monkeypatch):
    import client.training as training

    encoder, data, _ = site
    config = TrainConfig(epochs=3, batch_size=32, seed=5)
    fast = build_model(encoder, NANOPARTICLE_TASK, (16,), seed=1)
    train(fast, data, config)
    monkeypatch.setattr(training, "ShuffledBatches", lambda tensors, size, seed: training._loader(
        data, fast.spec, size, seed))
    slow = build_model(encoder, NANOPARTICLE_TASK, (16,), seed=1)
    train(slow, data, config)
    for a, b in zip(fast.state_dict().values(), slow.state_dict().values(), strict=True):
        assert torch.equal(a, b)
