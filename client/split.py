"""A site's rows split into train / validation / test and encoded for the models: the data side of training.

Kept apart from :mod:`client.training` (which imports torch) so that the messages that only need a site's
rows, its split or its encoded features (site check, statistics, histogram boosting, analytics) run in a
process that never imports torch: Flower 1.42's SuperNode starts a fresh ClientApp process per message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.encoding import FeatureEncoder
from shared.task import TaskSpec, assign_split


@dataclass
class EncodedSplit:
    """Encoded features and targets of one split of a site."""

    x: np.ndarray
    targets: dict[str, np.ndarray]
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.x)


def split_site(frame: pd.DataFrame, task: TaskSpec, seed: int) -> dict[str, pd.DataFrame]:
    """The site's rows by split (train / val / test), seeded and by patient for the built-in task."""
    labels = assign_split(frame, task, seed)
    return {name: frame[labels == name] for name in ("train", "val", "test")}


def encode(encoder: FeatureEncoder, frame: pd.DataFrame) -> EncodedSplit:
    return EncodedSplit(x=encoder.transform(frame), targets=encoder.encode_targets(frame), frame=frame)


def recorded_share(data: EncodedSplit) -> dict[str, float]:
    """Share of rows where each outcome is recorded (fixes the loss weights for the whole data set)."""
    return {name: float(np.mean(~np.isnan(y))) for name, y in data.targets.items()}
