"""Local training and evaluation of the outcome model at a site, with or without DP-SGD.

One training loop serves every mode: a federated round at a hospital, the local-only baseline and the
pooled baseline. Differential privacy is a wrapper around that loop, as Opacus intends: ``make_private``
wraps the model, optimizer and loader, and the accountant's history comes from (and goes back to) the
site's :class:`client.ledger.PrivacyLedger`, so ε composes across rounds, runs and restarts.
DP-SGD: Abadi et al., CCS 2016; Poisson sampling and RDP accounting as in Opacus (Yousefpour et al. 2021).

FedProx's proximal term (Li et al., MLSys 2020) is applied as a proximal step after each optimizer step,
w ← w − lr·μ·(w − w_global): it acts on parameters only, so it needs no per-sample gradient and costs no
privacy (the global model is public to the site).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.evaluation import summaries
from client.split import EncodedSplit, recorded_share
from shared import metrics
from shared.ann import AnnSpec, MultiTaskMLP, per_row_loss, predict
from shared.encoding import FeatureEncoder


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local training call."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.005
    proximal_mu: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings: Gaussian noise multiplier σ, per-sample clipping norm C, and how Opacus computes
    per-sample gradients. "ew" (expanded weights) was the fastest mode on this MLP in both runs of
    ``benchmarks/federated_ann.py`` (1.3-3.1× a non-DP step, against 2.7-3.5× for "hooks")."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "ew"


@dataclass
class TrainResult:
    """What a training call did: steps taken, the sampling rate, the mean loss, and the DP history."""

    steps: int
    sample_rate: float
    mean_loss: float
    history: list[tuple[float, float, int]]


def _tensors(data: EncodedSplit, spec: AnnSpec) -> list[torch.Tensor]:
    tensors = [torch.as_tensor(data.x, dtype=torch.float32)]
    return tensors + [torch.as_tensor(data.targets[name], dtype=torch.float32) for name, _, _ in spec.outcomes]


def _loader(data: EncodedSplit, spec: AnnSpec, batch_size: int, seed: int) -> DataLoader:
    """torch's loader of shuffled batches: what Opacus turns into its Poisson-sampling loader."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*_tensors(data, spec)), batch_size=min(batch_size, len(data)), shuffle=True,
                      generator=generator)


class ShuffledBatches:
    """The batches of ``DataLoader(TensorDataset(*tensors), batch_size, shuffle=True, generator=seeded)``, epoch
    after epoch, taken by slicing the tensors with each epoch's permutation instead of indexing and collating
    row by row: a round of an 80-row site spent 10 of its 18 ms of training in the loader (2026-12-04).

    It draws from the seeded generator what torch 2.13's loader draws per epoch, in its order: the iterator's
    base seed (``_BaseDataLoaderIter``), the permutation, and ``RandomSampler``'s draw for the remainder of
    ``num_samples // n`` whole permutations (none, but drawn), so the batches and the model are the same
    (``tests/test_training.py`` compares them with the loader's)."""

    def __init__(self, tensors: list[torch.Tensor], batch_size: int, seed: int) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self):
        n = len(self.tensors[0])
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator)
        torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield [t[rows] for t in self.tensors]


def train(model: MultiTaskMLP, data: EncodedSplit, config: TrainConfig, dp: DPConfig | None = None,
          history: list[tuple[float, float, int]] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data``; with ``dp``, by DP-SGD with the accountant's ``history``."""
    spec = model.spec
    batch_size = min(config.batch_size, len(data))
    loader = (_loader(data, spec, config.batch_size, config.seed) if dp is not None  # Opacus samples its own
              else ShuffledBatches(_tensors(data, spec), batch_size, config.seed))
    # frozen parameters (a personalisation method's shared body, ``client.personalised.fedper``) stay as they are
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else None
    shares = recorded_share(data)
    trained, engine = model, None
    if dp is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            # Opacus warns that its secure RNG is off (fine for research; a deployment may set secure_mode).
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            engine.accountant.history = list(history or [])
            trained, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm, poisson_sampling=True, grad_sample_mode=dp.grad_sample_mode)
    trained.train()
    # Opacus' hooks make torch note that inputs need no gradient; harmless, and repeated every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    steps, loss_sum, rows = 0, 0.0, 0
    torch.manual_seed(config.seed)
    for _ in range(config.epochs):
        for x, *ys in loader:
            optimizer.zero_grad()
            targets = {name: y for (name, _, _), y in zip(spec.outcomes, ys, strict=True)}
            # Poisson sampling can draw an empty batch: its loss is 0 and DP-SGD still adds the noise step.
            loss = per_row_loss(spec, trained(x), targets, shares).sum() / max(len(x), 1)
            loss.backward()
            optimizer.step()
            if anchor is not None:
                proximal_step(model, anchor, config.lr * config.proximal_mu)
            steps += 1
            loss_sum += loss.item() * len(x)
            rows += len(x)
    new_history = list(engine.accountant.history) if engine is not None else list(history or [])
    return TrainResult(steps=steps, sample_rate=sample_rate(len(data), config.batch_size),
                       mean_loss=loss_sum / max(rows, 1),
                       history=new_history)


@torch.no_grad()
def proximal_step(model: MultiTaskMLP, anchor: list[torch.Tensor], step: float) -> None:
    """``w ← w − step·(w − anchor)``: a gradient step on ``½‖w − anchor‖²`` scaled by ``step`` (= lr·μ), the
    proximal term of FedProx (μ) and of Ditto's personal objective (λ, ``client.personalised.ditto``)."""
    for p, a in zip(model.parameters(), anchor, strict=True):
        p.sub_(step * (p - a))


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the loader's length, ceil(n / batch); Opacus keeps it under Poisson
    sampling."""
    return max(int(np.ceil(n_rows / min(batch_size, n_rows))), 1)


def sample_rate(n_rows: int, batch_size: int) -> float:
    """The Poisson sampling rate Opacus derives from the loader: 1 / (steps per epoch)."""
    return 1.0 / steps_per_epoch(n_rows, batch_size)


def evaluate(model: MultiTaskMLP, encoder: FeatureEncoder, data: EncodedSplit,
             n_bins: int = metrics.DEFAULT_N_BINS) -> dict[str, dict]:
    """Summaries per outcome (``shared.metrics``) of the model on ``data``: aggregates only, no rows."""
    return summaries(encoder, data, predict(model, data.x), n_bins=n_bins)
