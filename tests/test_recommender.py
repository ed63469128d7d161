"""The recommender's inputs and outputs: the policy bundle check, patient JSON, vitals CSV, the CLI command."""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from client.recommender import (
    RecommenderInputError,
    load_policy,
    read_patient,
    read_vitals,
    recommend,
    recommend_many,
    with_vitals,
)
from fednano.cli import app
from shared.dosing_policy import FORMULATION_FEATURES, DosingPolicy
from shared.encoding import FeatureEncoder, SiteStatistics
from shared.patient_record import PatientRecord
from shared.policy_bundle import Manifest, build_bundle
from shared.task import NANOPARTICLE_TASK
from shared.wearables import summarise_cycle
from simulation.clinics import make_world

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "patient.json"


# ---------------------------------------------------------------------------------------------------------
# A small real policy: the encoder of a simulated clinic, two logistic outcome models (an ensemble whose
# members disagree a little), the clinic's formulations, the policy's own safety rules.


def _logistic_member(encoder: FeatureEncoder, response: dict[str, float], toxicity: dict[str, float]):
    """A predictor: P = sigmoid(intercept + Σ weight · encoded feature), per outcome."""
    names = encoder.feature_names_out_

    def weights(coefficients: dict[str, float]) -> tuple[float, np.ndarray]:
        w = np.zeros(len(names))
        for name, value in coefficients.items():
            if name != "intercept":
                w[names.index(name)] = value
        return coefficients["intercept"], w

    (b_r, w_r), (b_t, w_t) = weights(response), weights(toxicity)
    return lambda x: {"response": 1 / (1 + np.exp(-(b_r + x @ w_r))),
                      "toxicity_grade3": 1 / (1 + np.exp(-(b_t + x @ w_t)))}


def make_toy_policy(version: int = 4) -> DosingPolicy:
    """A DosingPolicy on the example patient's world (seed 3): response and toxicity both rise with dose."""
    from simulation.clinics import simulate_clinic

    world = make_world(3, 3)
    clinic = max(world.clinics, key=lambda c: c.n_patients)
    episodes, _ = simulate_clinic(world, clinic)
    encoder = FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(SiteStatistics.from_frame(episodes, NANOPARTICLE_TASK))
    formulations = episodes.groupby("formulation_id")[list(FORMULATION_FEATURES)].first().astype(float)
    members = {
        "a": _logistic_member(encoder, {"intercept": 0.0, "dose_mg_m2": 0.8, "interval_days": -0.2},
                              {"intercept": -1.6, "dose_mg_m2": 0.9, "interval_days": -0.4}),
        "b": _logistic_member(encoder, {"intercept": 0.1, "dose_mg_m2": 0.7, "interval_days": -0.1},
                              {"intercept": -1.5, "dose_mg_m2": 1.0, "interval_days": -0.3}),
    }
    manifest = Manifest(version=version, created_utc="2026-11-27T00:00:00Z", run_id="toy",
                        files={"policy.json": "0" * 64}, privacy={"clinic_00": {"epsilon": 2.5, "delta": 1e-5,
                                                                                 "budget": 3.0}},
                        metrics={"auc": 0.8}, safety_bounds={"cumulative_limit_mg_m2": 550.0},
                        signing_key_id="0" * 64)
    return DosingPolicy(encoder=encoder, members=members, formulations=formulations.to_dict("index"),
                        manifest=manifest)


# ---------------------------------------------------------------------------------------------------------
# A real signed bundle: the encoder of a simulated world, an ANN and XGBoost trained on its episodes (pooled, a
# few epochs and trees: seconds, not a federation), a fitted-Q dose adjuster, the policy document the server
# writes, signed with a coordinator key. Built once per test process; ``real_bundle`` signs any version of it.


@functools.cache
def real_policy_files(seed: int = 3) -> tuple[dict[str, Path], Path, Path]:
    """The bundle's files, the coordinator's signing key and the site's trust key (in a temporary folder)."""
    from client.boosting import BoostingConfig, train_pooled_heads
    from client.split import EncodedSplit
    from client.training import TrainConfig, train
    from shared.ann import build_model
    from shared.dose_adjustment import DoseAdjuster, Transitions, site_transitions
    from shared.dosing_policy import POLICY_FILE
    from simulation.clinics import simulate_clinic

    folder = Path(tempfile.mkdtemp(prefix="fednano-real-bundle-"))
    atexit.register(shutil.rmtree, folder, True)
    signing, trust = _key_pair(folder, "policy_signing")
    world = make_world(3, seed)
    simulated = [simulate_clinic(world, c) for c in world.clinics]
    episodes = pd.concat([e for e, _ in simulated], ignore_index=True)
    encoder = FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(SiteStatistics.from_frame(episodes, NANOPARTICLE_TASK))
    x, targets = encoder.transform(episodes), encoder.encode_targets(episodes)
    hidden = (32, 16)
    model = build_model(encoder, NANOPARTICLE_TASK, hidden, seed)
    train(model, EncodedSplit(x, targets, episodes), TrainConfig(epochs=3, batch_size=128, lr=0.01, seed=seed))
    files = {"encoder.json": folder / "encoder.json", "ann_federated.pt": folder / "ann_federated.pt"}
    files["encoder.json"].write_text(json.dumps(encoder.to_dict()))
    torch.save(model.state_dict(), files["ann_federated.pt"])
    heads = train_pooled_heads(encoder, x, targets, BoostingConfig(seed=seed), rounds=20)
    for key, model_bytes in heads.items():
        files[f"xgb_{key}.json"] = folder / f"xgb_{key}.json"
        files[f"xgb_{key}.json"].write_bytes(model_bytes)
    formulations = episodes.groupby("formulation_id")[list(FORMULATION_FEATURES)].mean().astype(float)
    models = {"ann": {"kind": "ann", "weights": "ann_federated.pt", "hidden": list(hidden)},
              "xgboost": {"kind": "xgboost", "heads": {key: f"xgb_{key}.json" for key in heads}}}
    transitions = [site_transitions(e, v) for e, v in simulated]
    adjuster = DoseAdjuster(iterations=5).fit(Transitions.concat(transitions))
    document = DosingPolicy(encoder=encoder, members={}, formulations=formulations.to_dict("index"),
                            adjuster=adjuster).document(models, "encoder.json")
    files[POLICY_FILE] = folder / POLICY_FILE
    files[POLICY_FILE].write_text(json.dumps(document, indent=1))
    return files, signing, trust


def real_bundle(out: Path, version: int = 1, signing_key: Path | None = None) -> tuple[Path, Path]:
    """A signed bundle of the real policy, version ``version``, in the new folder ``out``; and the trust key
    (the coordinator key of :func:`real_policy_files`, or ``signing_key``'s public half beside it)."""
    files, signing, trust = real_policy_files()
    bundle = build_bundle(out, files, version=version, run_id=f"run-{version}", privacy={}, metrics={},
                          safety_bounds={}, signing_key_path=signing_key or signing)
    return bundle, trust if signing_key is None else signing_key.with_suffix(".pub")


def example_dict() -> dict:
    return json.loads(EXAMPLE.read_text())


@pytest.fixture(scope="module")
def policy() -> DosingPolicy:
    return make_toy_policy()


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def vitals_frame(patient_id: str = "example-001", days: int = 21, fever_on: tuple[int, ...] = (),
                 steps_first: int = 4000, steps_second: int = 2000) -> pd.DataFrame:
    """One cycle of daily readings: temperature 36.8 °C (39.0 on ``fever_on`` days), fewer steps later."""
    day = np.arange(days)
    return pd.DataFrame({
        "patient_id": patient_id, "episode_id": "ep-3", "day": day,
        "temperature_c": np.where(np.isin(day, fever_on), 39.0, 36.8),
        "heart_rate_bpm": 80.0, "spo2_pct": 97.0,
        "steps": np.where(day <= (days - 1) / 2, steps_first, steps_second),
    })


# ---------------------------------------------------------------------------------------------------------
# Patient JSON


def test_example_patient_json_is_read_as_is():
    record = read_patient(EXAMPLE)
    assert record.patient_id == "example-001"
    assert record.cycle == 3 and record.bsa_m2 == pytest.approx(1.731)


def test_patient_json_with_a_syntax_error_names_file_line_and_column(tmp_path):
    text = EXAMPLE.read_text().replace('"cycle": 3,', '"cycle": 3', 1)
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(RecommenderInputError) as info:
        read_patient(path)
    line = info.value.lines[0]
    assert line.startswith(f"{path}, line 4 column 3: invalid JSON")


def test_patient_json_out_of_range_and_unknown_fields_are_each_named(tmp_path):
    record = example_dict() | {"age_years": 300, "wieght_kg": 60}
    record["previous_cycle"]["dose_mg_m2"] = -5
    with pytest.raises(RecommenderInputError) as info:
        read_patient(write_json(tmp_path / "p.json", record))
    text = str(info.value).replace(str(tmp_path), "DIR")
    assert "field age_years: Input should be less than or equal to 110" in text
    assert "field previous_cycle.dose_mg_m2: Input should be greater than or equal to 0" in text
    assert "300" not in text and "-5" not in text  # the field and the rule, never the value
    assert "field wieght_kg" in text and "Extra inputs are not permitted" in text
    assert len(info.value.lines) == 3


def test_patient_json_with_a_repeated_key_or_nan_is_refused(tmp_path):
    repeated = tmp_path / "repeated.json"
    repeated.write_text(EXAMPLE.read_text().replace('"cycle": 3,', '"cycle": 3, "cycle": 4,', 1))
    with pytest.raises(RecommenderInputError, match="key 'cycle' appears more than once"):
        read_patient(repeated)
    nan = tmp_path / "nan.json"
    nan.write_text(EXAMPLE.read_text().replace('"age_years": 66.1', '"age_years": NaN', 1))
    with pytest.raises(RecommenderInputError, match="NaN is not a JSON number"):
        read_patient(nan)


def test_missing_and_non_utf8_patient_files_are_named(tmp_path):
    with pytest.raises(RecommenderInputError, match="cannot read the file"):
        read_patient(tmp_path / "absent.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes(EXAMPLE.read_bytes().replace(b"example-001", b"exampl\xe9-001"))
    with pytest.raises(RecommenderInputError, match=r"not UTF-8 text \(byte 0xE9"):
        read_patient(latin)


# ---------------------------------------------------------------------------------------------------------
# Vitals CSV


def test_vitals_summary_replaces_the_records_wearable_summary(tmp_path):
    path = tmp_path / "vitals.csv"
    vitals_frame(fever_on=(9, 10)).to_csv(path, index=False)
    record, warnings = with_vitals(read_patient(EXAMPLE), path)
    summary = record.wearable_summary
    assert warnings == []
    assert summary.days_recorded == 21 and summary.fever_days == 2
    assert summary.max_temperature_c == 39.0
    # days 0-10 at 4000 steps (day <= 10 is the first half of a 20-day cycle), 11-20 at 2000: -50 %
    assert summary.steps_change_pct == pytest.approx(-50.0)
    assert summary.mean_steps == pytest.approx((11 * 4000 + 10 * 2000) / 21, abs=0.5)
    assert record.model_dump(exclude={"wearable_summary"}) == read_patient(EXAMPLE).model_dump(
        exclude={"wearable_summary"})


def test_vitals_summary_is_summarise_cycle_of_the_rows(tmp_path):
    frame = vitals_frame(days=14, fever_on=(3,))
    frame.loc[5, ["temperature_c", "spo2_pct"]] = np.nan
    path = tmp_path / "vitals.csv"
    frame.to_csv(path, index=False)
    readings, _ = read_vitals(path, "example-001")
    record, _ = with_vitals(read_patient(EXAMPLE), path)
    assert record.wearable_summary.model_dump() == summarise_cycle(frame)


def test_vitals_with_fahrenheit_temperature_names_file_row_column_and_hint(tmp_path):
    frame = vitals_frame()
    frame.loc[4, "temperature_c"] = 98.6
    path = tmp_path / "vitals.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(RecommenderInputError) as info:
        read_vitals(path, "example-001")
    assert info.value.lines == [f"{path}, column 'temperature_c', row 5 (line 6): expected a number in [33, 43] "
                                "°C, got 98.6 — values near 90-110 look like °F; give °C"]


def test_vitals_missing_column_and_non_number_are_named(tmp_path):
    frame = vitals_frame().drop(columns=["spo2_pct"]).astype({"steps": object})
    frame.loc[2, "steps"] = "many"
    path = tmp_path / "vitals.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(RecommenderInputError) as info:
        read_vitals(path, "example-001")
    text = str(info.value)
    assert "column 'spo2_pct', line 1: required column is missing" in text
    assert "column 'steps', row 3 (line 4): expected an integer in [0, 60000] step/day, got 'many'" in text


def test_vitals_of_another_patient_or_two_cycles_or_repeated_days_are_refused(tmp_path):
    frame = vitals_frame()
    frame.loc[[1, 2], "patient_id"] = "someone-else"
    frame.loc[20, "episode_id"] = "ep-2"
    frame.loc[7, "day"] = 6
    path = tmp_path / "vitals.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(RecommenderInputError) as info:
        read_vitals(path, "example-001")
    lines = info.value.lines
    assert len(lines) == 3
    assert lines[0] == (f"{path}, column 'patient_id', rows 2, 3 (lines 3, 4): expected the patient of the record "
                        "(its patient_id); these rows are another patient's")
    assert "someone-else" not in str(info.value)
    assert lines[1].startswith(f"{path}, column 'episode_id', row 21 (line 22): expected the readings of one "
                               "cycle")
    assert lines[2] == f"{path}, column 'day', rows 7, 8 (lines 8, 9): expected one row per day; day(s) 6 repeated"


def test_vitals_file_that_is_empty_or_excel_is_named(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(RecommenderInputError, match=r"empty.csv: the file is empty"):
        read_vitals(empty, "example-001")
    excel = tmp_path / "vitals.csv"
    excel.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(RecommenderInputError, match="Excel workbook"):
        read_vitals(excel, "example-001")


def test_unknown_vitals_column_is_a_warning_not_an_error(tmp_path):
    path = tmp_path / "vitals.csv"
    vitals_frame().assign(note="ok").to_csv(path, index=False)
    _, warnings = read_vitals(path, "example-001")
    assert warnings == [f"{path}, column 'note', line 1: unknown column, ignored"]


# ---------------------------------------------------------------------------------------------------------
# Recommending


def test_recommendation_of_the_example_patient_obeys_the_policys_rules(policy):
    result = recommend(policy, read_patient(EXAMPLE))
    assert result["action"] == "give"
    assert result["formulation_id"] in example_dict()["catalogue"]
    assert result["dose_mg"] == pytest.approx(round(result["dose_mg_m2"] * 1.731, 1))
    space = policy.action_space
    assert space.dose_min_mg_m2 <= result["dose_mg_m2"] <= space.dose_max_mg_m2
    assert result["interval_days"] in {space.label_interval_days["ovarian"] + d for d in space.delays_days}
    for outcome in ("response", "toxicity"):
        estimate = result[outcome]
        assert 0 <= estimate["low"] <= estimate["mean"] <= estimate["high"] <= 1
    assert result["policy_version"] == 4
    assert json.loads(json.dumps(result)) == result


def test_fever_in_the_vitals_with_low_anc_withholds_the_dose(policy, tmp_path):
    record = PatientRecord.model_validate(example_dict() | {"anc_baseline_e9_l": 1.2})
    path = tmp_path / "vitals.csv"
    vitals_frame(fever_on=(12,)).to_csv(path, index=False)
    calm = recommend(policy, record)
    feverish = recommend(policy, with_vitals(record, path)[0])
    assert calm["action"] == "give"
    assert feverish["action"] == "withhold" and feverish["dose_mg"] == 0.0
    assert [r["rule"] for r in feverish["rules"]] == ["neutropenia-hold"]
    assert "fever on 1 day(s)" in feverish["rules"][0]["reason"]


def test_catalogue_unknown_to_the_policy_is_named(policy):
    record = PatientRecord.model_validate(example_dict() | {"catalogue": ["XX01"]})
    with pytest.raises(RecommenderInputError) as info:
        recommend_many(policy, [read_patient(EXAMPLE), record], "body")
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith("body[1]: field catalogue: none of its 1 formulation(s) is known")


def test_batched_recommendations_match_one_by_one(policy):
    base = example_dict()
    records = [PatientRecord.model_validate(base | {"patient_id": f"p{i}", "bsa_m2": 1.5 + 0.05 * i,
                                                    "weight_kg": round((1.5 + 0.05 * i) ** 2 * 3600 / 160.8, 1),
                                                    "cumulative_dose_mg_m2": 80.0 + 66 * i}) for i in range(8)]
    batch = recommend_many(policy, records)
    single = [recommend_many(policy, [r])[0] for r in records]
    assert batch == single
    assert batch[-1].action == "stop"  # 542 of 550 mg/m² leaves less than the smallest dose (10)
    assert batch[-1].formulation_id is None and batch[-1].dose_mg == 0.0
    assert math.isclose(batch[0].dose_mg, round(batch[0].dose_mg_m2 * 1.5, 1))


# ---------------------------------------------------------------------------------------------------------
# Loading the signed policy


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_bundle_signed_by_another_key_is_refused_with_the_reason(tmp_path):
    coordinator, _ = _key_pair(tmp_path, "coordinator")
    _, stranger = _key_pair(tmp_path, "stranger")
    document = write_json(tmp_path / "policy.json", {"kind": "fednano-dosing-policy/1"})
    bundle = build_bundle(tmp_path / "bundle", {"policy.json": document}, version=1, run_id="1", privacy={},
                          metrics={}, safety_bounds={}, signing_key_path=coordinator)
    with pytest.raises(RecommenderInputError) as info:
        load_policy(bundle, stranger)
    line = info.value.lines[0]
    assert line.startswith(f"policy bundle {bundle} rejected: the signature of manifest.json does not verify")
    assert line.endswith(f"(trust key {stranger})")


def test_missing_bundle_or_key_is_named(tmp_path):
    _, public = _key_pair(tmp_path, "site")
    with pytest.raises(RecommenderInputError, match="no such policy bundle folder"):
        load_policy(tmp_path / "nowhere", public)
    with pytest.raises(RecommenderInputError, match="no such trust key file"):
        load_policy(tmp_path, tmp_path / "absent.pub")


# ---------------------------------------------------------------------------------------------------------
# The command


def test_cli_recommend_refuses_an_unverified_bundle_without_a_traceback(tmp_path):
    _, public = _key_pair(tmp_path, "site")
    result = CliRunner().invoke(app, ["recommend", "--policy", str(tmp_path), "--trust", str(public),
                                      "--patient", str(EXAMPLE)])
    assert result.exit_code == 1
    assert f"policy bundle {tmp_path} rejected" in result.output and "Traceback" not in result.output


@pytest.fixture
def cli_policy(policy, monkeypatch):
    """The CLI with the toy policy in place of a verified bundle (the bundle check is tested above)."""
    import client.recommender

    monkeypatch.setattr(client.recommender, "load_policy", lambda bundle, trust: policy)
    return ["recommend", "--policy", "bundle", "--trust", "key.pub"]


def test_cli_recommend_prints_the_recommendation_json(cli_policy, policy):
    result = CliRunner().invoke(app, [*cli_policy, "--patient", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == recommend(policy, read_patient(EXAMPLE))


def test_cli_recommend_with_vitals_uses_their_summary(cli_policy, tmp_path):
    record = write_json(tmp_path / "p.json", example_dict() | {"anc_baseline_e9_l": 1.2})
    vitals = tmp_path / "vitals.csv"
    vitals_frame(fever_on=(3, 4)).assign(extra=1).to_csv(vitals, index=False)
    result = CliRunner().invoke(app, [*cli_policy, "--patient", str(record), "--vitals", str(vitals)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["action"] == "withhold"
    assert f"warning: {vitals}, column 'extra', line 1: unknown column, ignored" in result.stderr


def test_cli_recommend_fhir_prints_a_medication_request(cli_policy):
    result = CliRunner().invoke(app, [*cli_policy, "--patient", str(EXAMPLE), "--fhir"])
    assert result.exit_code == 0, result.output
    resource = json.loads(result.stdout)
    assert resource["resourceType"] == "MedicationRequest" and resource["status"] == "active"


def test_cli_recommend_fhir_for_a_stop_says_why(cli_policy, tmp_path):
    record = write_json(tmp_path / "p.json", example_dict() | {"cumulative_dose_mg_m2": 545.0})
    result = CliRunner().invoke(app, [*cli_policy, "--patient", str(record), "--fhir"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resourceType"] == "OperationOutcome"
    assert "no MedicationRequest: cumulative-limit: no further anthracycline" in result.stderr


def test_cli_recommend_names_every_bad_field_and_exits_1(cli_policy, tmp_path):
    record = write_json(tmp_path / "p.json", example_dict() | {"ecog": 9, "sex": "X"})
    result = CliRunner().invoke(app, [*cli_policy, "--patient", str(record)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"error: {record}: field ecog: Input should be less than or equal to 4" in result.stderr
    assert f"error: {record}: field sex: Input should be 'F' or 'M'" in result.stderr
    assert "Traceback" not in result.output
