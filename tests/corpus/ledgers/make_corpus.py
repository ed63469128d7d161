"""Write the corrupted-ledger corpus: ``baseline.json`` (a valid 3-entry ledger), one file per corrupted case and
``cases.json`` (what each case is and the words its error must contain). Run from the project root::

    PYTHONPATH=. python tests/corpus/ledgers/make_corpus.py

``tests/test_ledger_corpus.py`` puts the baseline in a site folder, opens it (its head is then known), puts
each case in its place and checks that opening it is refused with those words, the file left as it was.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from client.ledger import _epsilon
from client.ledger_file import Chain, new_header

HERE = Path(__file__).parent
DELTA, BUDGET = 1e-5, 10.0
SITE_ID, OTHER_SITE_ID = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
STEPS = [(1.0, 1 / 13, 13), (1.0, 1 / 13, 13), (1.5, 0.1, 5)]


def ledger(site_id: str = SITE_ID, steps=STEPS, delta: float = DELTA) -> dict:
    chain = Chain(new_header(delta, site_id, 1, None, started="2025-03-01T09:00:00+00:00"), [], [])
    history: list = []
    for i, (sigma, rate, n) in enumerate(steps):
        history = history + [(sigma, rate, n)]
        chain.append({"run_id": "run-1", "round": i + 1, "steps": n, "noise_multiplier": sigma,
                        "sample_rate": rate, "epsilon_after": _epsilon(tuple(_merged(history)), delta),
                        "epsilon_budget": BUDGET, "utc": f"2025-03-01T09:0{i + 1}:00+00:00", "phase": "training"})
    return chain.to_file()


def _merged(steps):
    out = []
    for sigma, rate, n in steps:
        if out and out[-1][:2] == (sigma, rate):
            out[-1] = (sigma, rate, out[-1][2] + n)
        else:
            out.append((sigma, rate, n))
    return out


def rechained(state: dict, change) -> dict:
    """``state`` with ``change`` applied to its entries and every hash recomputed (a careful forger)."""
    header = {k: v for k, v in state.items() if k not in ("entries", "history", "head")}
    chain = Chain(header, [], [])
    for entry in change(copy.deepcopy(state["entries"])):
        chain.append({k: v for k, v in entry.items() if k != "prev"})
    return chain.to_file()


def text(state: dict) -> str:
    return json.dumps(state, indent=2, ensure_ascii=False) + "\n"


def edited(change) -> str:
    state = copy.deepcopy(BASELINE)
    change(state)
    return text(state)


BASELINE = ledger()
BASELINE_TEXT = text(BASELINE)
MERGED = [[1.0, 1 / 13, 26], [1.5, 0.1, 5]]

# case: (what, how: "file" | "symlink" | "folder" | "delete", content, head known?, words the error must contain)
CASES: dict[str, tuple[str, str, str | bytes | None, bool, str]] = {
    "not-json": ("a file cut off inside a string", "file", BASELINE_TEXT[:70], True, "is unreadable"),
    "empty-file": ("emptied to 0 bytes (`: > privacy_ledger.json`)", "file", "", True, "is unreadable"),
    "truncated-half": ("the first half of the file (a full disk)", "file", BASELINE_TEXT[: len(BASELINE_TEXT) // 2],
                       True, "is unreadable"),
    "not-utf8": ("binary garbage", "file", b"\xff\xfe\x00{", True, "is unreadable"),
    "not-an-object": ("a JSON list", "file", "[]\n", True, "not a JSON object"),
    "future-schema": ("schema_version 3", "file", edited(lambda s: s.update(schema_version=3)), True,
                      "schema_version 3, expected 2"),
    "missing-history": ("no history key", "file", edited(lambda s: s.pop("history")), True,
                        "keys missing ['history']"),
    "nan-noise": ("NaN as a noise multiplier", "file",
                  BASELINE_TEXT.replace('"noise_multiplier": 1.0', '"noise_multiplier": NaN', 1), True,
                  "NaN is not a JSON number"),
    "infinite-epsilon": ("1e400 (infinity once parsed) as epsilon_after", "file",
                         edited(lambda s: s["entries"][1].update(epsilon_after="@INF@")).replace('"@INF@"', "1e400"),
                         True, "key 'epsilon_after': a number too large for a double (it would become infinity)"),
    "negative-steps": ("-13 steps in an entry", "file", edited(lambda s: s["entries"][1].update(steps=-13)), True,
                       "steps must be an integer >= 1, got -13"),
    "boolean-steps": ("steps: true", "file", edited(lambda s: s["entries"][0].update(steps=True)), True,
                      "steps must be an integer >= 1, got True"),
    "sample-rate-above-1": ("sample_rate 2.0", "file", edited(lambda s: s["entries"][2].update(sample_rate=2.0)),
                            True, "sample_rate must be in (0, 1], got 2.0"),
    "steps-edited-down": ("entry 0 from 13 to 1 steps, history made to match", "file",
                          edited(lambda s: (s["entries"][0].update(steps=1), s.update(history=[[1.0, 1 / 13, 14],
                                                                                             [1.5, 0.1, 5]]))),
                          True, "entry 0 was edited"),
    "budget-raised-in-last-entry": ("the last entry's epsilon_budget from 10 to 30", "file",
                                    edited(lambda s: s["entries"][2].update(epsilon_budget=30.0)), True,
                                    "entry 2 was edited: its hash no longer matches the file's head"),
    "middle-entry-removed": ("entry 1 deleted, history made to match", "file",
                             edited(lambda s: (s["entries"].pop(1), s.update(history=[[1.0, 1 / 13, 13],
                                                                                     [1.5, 0.1, 5]]))),
                             True, "entries were removed or reordered"),
    "entries-reordered": ("entries 0 and 2 swapped", "file",
                          edited(lambda s: s["entries"].reverse()), True, "entries were removed or reordered"),
    "history-disagrees": ("history steps lowered, entries intact", "file",
                          edited(lambda s: s.update(history=[[1.0, 1 / 13, 1], [1.5, 0.1, 5]])), True,
                          "is not the entries' steps merged"),
    "delta-edited": ("δ in the header from 1e-5 to 1e-4", "file", edited(lambda s: s.update(delta=1e-4)), True,
                     "the header (δ, site id, budget number) was edited"),
    "head-field-edited": ("the file's own head hash changed", "file",
                          edited(lambda s: s.update(head="0" * 64)), True, "no longer matches the file's head"),
    "duplicate-key": ("entry 0 holding \"steps\" twice (13, then 1)", "file",
                      BASELINE_TEXT.replace('"steps": 13,', '"steps": 13, "steps": 1,', 1), True,
                      "'steps' appears more than once"),
    "extra-entry-key": ("an entry with a key of its own", "file",
                        edited(lambda s: s["entries"][0].update(note="fixed by hand")), True, "expected the keys"),
    "prev-missing": ("an entry without its prev hash", "file", edited(lambda s: s["entries"][1].pop("prev")), True,
                     "expected the keys"),
    "site-id-malformed": ("site_id not hex", "file", edited(lambda s: s.update(site_id="hospital-a")), True,
                          "site_id 'hospital-a'"),
    "last-entry-removed": ("the last entry dropped, chain and head field kept valid", "file",
                           text(ledger(steps=STEPS[:2])), True, "is behind: it holds 2 entries"),
    "rewritten-chain": ("entry 0 from 13 to 1 steps with every hash recomputed", "file",
                        text(rechained(BASELINE, lambda es: [{**es[0], "steps": 1}, *es[1:]])), True,
                        "was rewritten: its first 3 entries no longer hash to the head"),
    "emptied-valid": ("a valid empty ledger of a new site (what deleting and retraining would write)", "file",
                      text(ledger(site_id=OTHER_SITE_ID, steps=[])), True,
                      "is another ledger than the one this site keeps"),
    "other-sites-ledger": ("another site's valid ledger copied in", "file",
                           text(ledger(site_id=OTHER_SITE_ID, steps=STEPS[:1])), True,
                           "is another ledger than the one this site keeps"),
    "version-1-replacement": ("an empty version-1 ledger where a version-2 one was", "file",
                              '{"schema_version": 1, "delta": 1e-05, "entries": [], "history": []}\n', True,
                              "is a version-1 file, but its head"),
    "version-1-negative-steps": ("a version-1 ledger (no head yet) with -5 steps", "file",
                                 json.dumps({"schema_version": 1, "delta": 1e-05, "history": [[1.0, 0.1, -5]],
                                             "entries": []}) + "\n", False,
                                 "(version 1) is corrupt: history step [1.0, 0.1, -5]"),
    "symlink": ("replaced by a symbolic link to a valid copy", "symlink", None, True, "is a symbolic link"),
    "folder": ("a folder in the ledger's place", "folder", None, True, "is a folder, not a ledger file"),
    "deleted": ("the file deleted", "delete", None, True, "is missing, but this site has recorded DP training"),
}


def main() -> None:
    (HERE / "baseline.json").write_text(BASELINE_TEXT, encoding="utf-8")
    manifest = []
    for case, (what, how, content, registered, expected) in CASES.items():
        file = None
        if content is not None:
            file = f"{case}.json"
            data = content if isinstance(content, bytes) else content.encode()
            (HERE / file).write_bytes(data)
        manifest.append({"case": case, "what": what, "how": how, "file": file, "head_known": registered,
                         "expected": expected})
    (HERE / "cases.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
