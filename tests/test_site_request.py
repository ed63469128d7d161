"""client.site.SiteRequest.encoded: a site's encoded split is made once per site, split and encoder in a process."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, RecordDict

from client.site import SiteRequest, SiteSource, load
from shared.encoding import FeatureEncoder, fit_local
from shared.protocol.privacy import RunPlan
from shared.protocol.training import AnnTraining
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import SitePrivacy, generate_sites


def request(source: SiteSource, encoder: FeatureEncoder, split_seed: int = 0) -> SiteRequest:
    config = AnnTraining(local_epochs=1, batch_size=32, lr=0.01, seed=0, split_seed=split_seed, max_grad_norm=1.0,
                         num_rounds=1, hidden=(8,), plan=RunPlan(("statistics", "training"))).to_config(encoder)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return SiteRequest(source, load(source), config, context)


def test_the_same_site_split_and_encoder_give_the_kept_split_and_anything_else_a_new_one(tmp_path):
    world = generate_sites(1, 5, tmp_path, patients_per_clinic=40, privacy=SitePrivacy(dp=False))
    source = SiteSource(tmp_path / world.clinics[0].name)
    site = load(source)
    encoder = fit_local(site.episodes, NANOPARTICLE_TASK)
    first = request(source, encoder).encoded("train")
    assert request(source, encoder).encoded("train") is first  # a later message of the same run
    other_split = request(source, encoder).encoded("test")
    other_seed = request(source, encoder, split_seed=1).encoded("train")
    other_encoder = request(source, fit_local(site.episodes.iloc[:20], NANOPARTICLE_TASK)).encoded("train")
    assert all(x is not first for x in (other_split, other_seed, other_encoder))
    assert len(first) + len(other_split) < len(site.episodes)  # train and test are different rows
    assert not np.array_equal(other_encoder.x, first.x)  # and another encoder encodes them differently
