"""The simulation's attack mode: parsed from SITE:KIND, applied to the attacker's replies only, honest code
untouched; impossible robust settings and unknown attackers refused before anything runs."""

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord

from client.site import SiteSource
from shared import metrics
from shared.task import NANOPARTICLE_TASK
from shared.validation import load_site
from simulation.attacks import (
    Attack,
    AttackError,
    attackers_by_partition,
    flip_labels,
    poisoned_copy,
    swap_binary_labels,
)
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, ExperimentError, check_robustness_options


def test_attacks_parse_with_their_default_or_given_factor():
    assert Attack.parse("clinic_03:scale") == Attack("clinic_03", "scale", 10.0)
    assert Attack.parse("clinic_03:scale=4") == Attack("clinic_03", "scale", 4.0)
    assert Attack.parse("clinic_01:sign-flip") == Attack("clinic_01", "sign-flip", 1.0)
    assert Attack.parse("a:label-flip") == Attack("a", "label-flip", 0.0)
    assert Attack.parse("a:lie").to_record() == {"site": "a", "kind": "lie", "factor": 0.0}
    assert Attack.parse("a:inflate") == Attack("a", "inflate", 10.0)
    assert Attack.parse("a:inflate=1.5") == Attack("a", "inflate", 1.5)
    for bad, why in (("clinic_03", "SITE:KIND"), ("clinic_03:poison", "sign-flip, scale, label-flip, lie"),
                     ("a:lie=3", "only sign-flip, scale, inflate"), ("a:scale=x", "a number"),
                     ("a:scale=-2", "positive"), ("a:inflate=0", "positive")):
        with pytest.raises(AttackError, match=why):
            Attack.parse(bad)


def test_poisoned_updates_are_the_negated_or_scaled_update_from_the_global_model():
    global_ = {"w": np.array([1.0, 2.0])}
    trained = ArrayRecord({"w": Array(np.array([1.5, 1.0], dtype=np.float32))})  # update (0.5, −1)
    flipped = Attack("s", "sign-flip", 1.0).poison_update(global_, trained)["w"].numpy()
    np.testing.assert_allclose(flipped, [0.5, 3.0])
    assert flipped.dtype == np.float32
    scaled = Attack("s", "scale", 10.0).poison_update(global_, trained)["w"].numpy()
    np.testing.assert_allclose(scaled, [6.0, -8.0])


def test_a_lying_site_reports_the_complement_of_its_auc():
    y, p = [0, 1, 1, 0, 1], [0.2, 0.9, 0.4, 0.6, 0.7]
    record = metrics.to_metric_record(metrics.summarise("binary", y, p), prefix="response")
    record.update(metrics.to_metric_record(metrics.summarise("regression", [1.0, 2.0], [1.5, 2.5]), prefix="eff"))
    honest = metrics.binary_metrics(metrics.from_metric_record(record, "response"))
    swap_binary_labels(record)
    lie = metrics.binary_metrics(metrics.from_metric_record(record, "response"))
    assert lie["auc"] == pytest.approx(1 - honest["auc"])
    assert lie == metrics.binary_metrics(metrics.summarise("binary", [1 - v for v in y], p)) | {
        k: lie[k] for k in ("mae", "rmse", "brier") if k in lie}  # errors against the label are not rewritten
    assert record["eff/sum_y"] == 3.0


def test_label_flip_copy_flips_binary_outcomes_keeps_the_rest_and_still_validates(tmp_path):
    frame = pd.DataFrame({"response": [0, 1, None], "toxicity_grade3": [1, 0, 0], "efficacy_pct": [5.0, 6.0, 7.0]})
    flipped = flip_labels(frame, NANOPARTICLE_TASK)
    assert flipped["response"].tolist()[:2] == [1, 0] and pd.isna(flipped["response"].iloc[2])
    assert flipped["toxicity_grade3"].tolist() == [0, 1, 1]
    assert flipped["efficacy_pct"].tolist() == [5.0, 6.0, 7.0]
    world = generate_sites(2, 0, tmp_path / "sites", patients_per_clinic=20, privacy=SitePrivacy(dp=False))
    source = SiteSource(tmp_path / "sites" / world.clinics[0].name)
    copy = poisoned_copy(source, tmp_path / "attacks")
    original, poisoned = load_site(source.path), load_site(copy.path)  # load_site validates
    assert poisoned.name == original.name and copy.path != source.path
    known = original.episodes["response"].notna()
    assert (poisoned.episodes["response"][known] == 1 - original.episodes["response"][known]).all()


def test_unknown_or_doubled_attackers_and_too_small_federations_are_refused_before_running(tmp_path):
    world = generate_sites(5, 0, tmp_path / "sites", patients_per_clinic=20, privacy=SitePrivacy(dp=False))
    sources = [SiteSource(tmp_path / "sites" / c.name) for c in world.clinics]
    assert attackers_by_partition([Attack.parse("clinic_03:lie")], sources) == {3: Attack("clinic_03", "lie")}
    with pytest.raises(AttackError, match="no site 'clinic_09' in this run"):
        attackers_by_partition([Attack.parse("clinic_09:lie")], sources)
    with pytest.raises(AttackError, match="two attacks"):
        attackers_by_partition([Attack.parse("clinic_01:lie"), Attack.parse("clinic_01:scale")], sources)
    with pytest.raises(ExperimentError, match="bulyan tolerating 1 malicious site needs n ≥ 4f \\+ 3, at least 7"):
        check_robustness_options(ExperimentConfig(out=tmp_path, strategy="bulyan"), sources)
    with pytest.raises(ExperimentError, match="no site 'x'"):
        check_robustness_options(ExperimentConfig(out=tmp_path, strategy="krum", attacks=["x:scale"]), sources)
    check_robustness_options(ExperimentConfig(out=tmp_path, strategy="krum", attacks=["clinic_00:scale"]), sources)
    with pytest.raises(ExperimentError, match="choose one update norm bound"):
        check_robustness_options(ExperimentConfig(out=tmp_path, clip_norm=1.0, clip_median_factor=2.0), sources)
    check_robustness_options(ExperimentConfig(out=tmp_path, clip_median_factor=2.0), sources)


def test_the_honest_client_code_has_no_attack_in_it():
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "client").glob("*.py"):
        assert "attack" not in path.read_text().lower(), path  # the attacks live in simulation/attacks.py


def test_the_mod_rewrites_the_attackers_replies_only(task_identity):
    from flwr.app import Context, Message, MetricRecord, RecordDict

    from simulation.attacks import attack_mod

    def honest(msg, context):  # the honest handler: one step from the global weights, a true summary
        trained = ArrayRecord({"w": Array(msg.content["arrays"]["w"].numpy() + 1.0)})
        summary = metrics.to_metric_record(metrics.summarise("binary", [0, 1], [0.2, 0.8]), prefix="response")
        return Message(RecordDict({"arrays": trained, "metrics": summary}), reply_to=msg)

    mod = attack_mod({1: Attack("clinic_01", "scale", 10.0), 2: Attack("clinic_02", "lie")})

    def reply(partition: int, message_type: str):
        msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2))}), "m": MetricRecord({})}),
                      dst_node_id=0, message_type=message_type)
        context = Context(run_id=1, node_id=0, node_config={"partition-id": partition}, state=RecordDict(),
                          run_config={})
        return mod(msg, context, honest).content

    np.testing.assert_allclose(reply(0, "train")["arrays"]["w"].numpy(), [1.0, 1.0])  # honest site
    np.testing.assert_allclose(reply(1, "train")["arrays"]["w"].numpy(), [10.0, 10.0])  # scaled update
    np.testing.assert_allclose(reply(1, "train.xgboost")["arrays"]["w"].numpy(), [1.0, 1.0])  # ANN only
    np.testing.assert_allclose(reply(2, "train")["arrays"]["w"].numpy(), [1.0, 1.0])  # a liar trains honestly
    auc = {p: metrics.binary_metrics(metrics.from_metric_record(reply(p, "evaluate")["metrics"], "response"))["auc"]
           for p in (0, 1, 2)}
    assert auc == {0: 1.0, 1: 1.0, 2: 0.0}
