"""``query.catalogue`` and ``query.install_policy``: product specifications in, a signed bundle out.

A site reports the formulations it stocks with their properties (product specifications: no patient value,
and public, so not a DP release), and installs the signed policy bundle the server sends file by file.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.off_policy import ValueSums
from shared.protocol import records as r
from shared.protocol.privacy import RELEASE_INDEX, RELEASES


def catalogue_reply(properties: dict[str, dict[str, float]], features: tuple[str, ...]) -> RecordDict:
    """Formulation id → its properties (``features`` in order), as a site's reply."""
    ids = sorted(properties)
    return RecordDict({r.CATALOGUE: ConfigRecord({"ids": ids or [""]}),
                       r.PROPERTIES: MetricRecord({name: [float(properties[i][name]) for i in ids] or [0.0]
                                                   for name in features})})


def catalogue_of(content: RecordDict, features: tuple[str, ...]) -> dict[str, dict[str, float]]:
    ids = [i for i in content[r.CATALOGUE]["ids"] if i]
    props = content[r.PROPERTIES]
    return {fid: {name: float(props[name][j]) for name in features} for j, fid in enumerate(ids)}


def value_request(files: dict[str, bytes], split_seed: int, releases: int, index: int) -> RecordDict:
    """``query.policy_value``: the candidate policy's files (``policy.json``, encoder, models; not signed: it is
    only evaluated) and the split seed whose held-out cycles the site evaluates on."""
    return RecordDict({r.BUNDLE: ConfigRecord(dict(files)),
                       r.CONFIG: ConfigRecord({r.SPLIT_SEED: split_seed, RELEASES: releases, RELEASE_INDEX: index})})


def value_reply(sums: ValueSums) -> RecordDict:
    return RecordDict({r.SUMS: r.to_array_record(sums.arrays())})


def value_of(content: RecordDict) -> ValueSums:
    arrays = r.from_array_record(content[r.SUMS])
    noise = float(content[r.PRIVACY]["noise-sd"]) if r.PRIVACY in content else 0.0
    return ValueSums(**{k: float(v[0]) for k, v in arrays.items()}, noise_sd=noise)


def install_request(files: dict[str, bytes]) -> RecordDict:
    """The bundle's files by name (manifest, signature, policy, models)."""
    return RecordDict({r.BUNDLE: ConfigRecord(dict(files))})


def bundle_files(content: RecordDict) -> dict[str, bytes]:
    return {name: bytes(data) for name, data in content[r.BUNDLE].items()}


@dataclass(frozen=True)
class Installed:
    """A site's reply once it installed a bundle."""

    version: int
    path: str

    def to_records(self) -> RecordDict:
        return RecordDict({r.STATUS: ConfigRecord({"version": self.version, "installed-path": self.path})})

    @classmethod
    def from_records(cls, content: RecordDict) -> Installed:
        status = content[r.STATUS]
        return cls(int(status["version"]), str(status["installed-path"]))
