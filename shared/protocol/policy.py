"""``query.catalogue`` and ``query.install_policy``: product specifications in, a signed bundle out.

A site reports the formulations it stocks with their properties (product specifications: no patient value,
and public, so not a DP release), and installs the signed policy bundle the server sends file by file, with
the release gate's verdict on that site's own logs (:class:`SiteVerdict`: that site's figures only, never
another site's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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


@dataclass(frozen=True)
class SiteVerdict:
    """What the release gate found on one site's own logs (``shared.off_policy.gate``'s ``per_site`` entry):
    the mean of (candidate − standard of care) in utility per patient, its 95 % interval, the cycles behind it,
    and ``worse``: the interval lies below 0 (that site should serve its standard of care). ``None`` where
    too few cycles made no estimate."""

    worse: bool
    estimate: float | None
    lower: float | None
    upper: float | None
    n: float

    KEYS = {"worse": "site-worse", "estimate": "site-estimate", "lower": "site-lower", "upper": "site-upper",
            "n": "site-cycles"}
    """Field → key of the message's ConfigRecord (a missing estimate is a missing key)."""

    def __post_init__(self) -> None:
        if not isinstance(self.worse, bool):
            raise ValueError(f"verdict 'worse': expected true or false, got {type(self.worse).__name__}")
        for name in ("estimate", "lower", "upper", "n"):
            value = getattr(self, name)
            if value is None and name != "n":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"verdict {name!r}: expected a finite number, got {type(value).__name__}")
        if self.n < 0:
            raise ValueError("verdict 'n': expected a count of cycles (>= 0)")

    @classmethod
    def of_gate(cls, entry: dict | None) -> SiteVerdict | None:
        """A site's verdict from its ``per_site`` entry; None for a site the gate did not judge (it failed or
        refused to value the candidate: no entry with ``worse``)."""
        if not entry or "worse" not in entry:
            return None

        def finite(key: str) -> float | None:
            value = entry.get(key)
            return float(value) if value is not None and math.isfinite(value) else None

        return cls(bool(entry["worse"]), finite("estimate"), finite("lower"), finite("upper"),
                   float(entry.get("n") or 0.0))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> SiteVerdict:
        """From :meth:`to_dict`'s form; ``ValueError`` naming the field for anything else."""
        if not isinstance(values, dict) or set(values) != set(cls.KEYS):
            raise ValueError(f"expected the keys {sorted(cls.KEYS)}")
        return cls(**values)

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({key: getattr(self, name) for name, key in self.KEYS.items()
                             if getattr(self, name) is not None})

    @classmethod
    def from_config(cls, config: ConfigRecord) -> SiteVerdict:
        unknown = sorted(set(config) - set(cls.KEYS.values()))
        if unknown:
            raise ValueError(f"verdict: unknown key(s) {unknown}")
        if cls.KEYS["worse"] not in config or cls.KEYS["n"] not in config:
            raise ValueError(f"verdict: expected the keys {cls.KEYS['worse']!r} and {cls.KEYS['n']!r}")
        return cls(**{name: config.get(key) for name, key in cls.KEYS.items()})

    def describe(self) -> str:
        """The figures in words: "estimate -0.052 utility per patient, 95 % interval [-0.090, -0.014], n = 120"."""
        if self.estimate is None or self.lower is None or self.upper is None:
            return f"no estimate (n = {self.n:g})"
        return (f"estimate {self.estimate:+.3f} utility per patient, 95 % interval [{self.lower:+.3f}, "
                f"{self.upper:+.3f}], n = {self.n:g}")


def install_request(files: dict[str, bytes], verdict: SiteVerdict | None = None) -> RecordDict:
    """The bundle's files by name (manifest, signature, policy, models) and, if the gate judged the receiving site,
    its own verdict (one message per site: a site never sees another's)."""
    content = RecordDict({r.BUNDLE: ConfigRecord(dict(files))})
    if verdict is not None:
        content[r.VERDICT] = verdict.to_config()
    return content


def bundle_files(content: RecordDict) -> dict[str, bytes]:
    return {name: bytes(data) for name, data in content[r.BUNDLE].items()}


def verdict_of(content: RecordDict) -> SiteVerdict | None:
    """The site's verdict an install request carries, or None; ``ValueError`` if it is malformed."""
    return SiteVerdict.from_config(content[r.VERDICT]) if r.VERDICT in content else None


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
