"""A simulated clinic's ``query.personalise`` request, as the site's handler sees it: shared by the tests of the
ANN personalisation handler (its candidates, the mix, the default choice rule)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from client.site import SiteRequest, SiteSource, load
from client.split import split_site
from shared import metrics
from shared.ann import build_model, to_arrays
from shared.encoding import fit_local
from shared.protocol import messages
from shared.protocol import personalisation as p
from shared.protocol import records as r
from shared.protocol.training import EVAL_BINS, AnnTraining


def personalise_request(root: Path, name: str, plan: p.Personalisation, dp: bool, run_id: int = 11
                        ) -> tuple[Message, SiteRequest]:
    """Clinic ``name`` of the world in ``root / "sites"`` (generated under DP) asked to personalise a fresh
    (16, 8) model by ``plan``; ``dp`` False runs it as a site without DP. One epoch, seed 5; the evaluation bins
    as the server sets them."""
    source = SiteSource(root / "sites" / name, state_dir=root / "heads")
    site = load(source)
    if not dp:  # a copy: the loaded site is cached for the other tests
        site = dataclasses.replace(site, config={**site.config, "privacy": {"dp": False}})
    encoder = fit_local(split_site(site.episodes, site.task, 5)["train"], site.task)
    config = AnnTraining(local_epochs=1, batch_size=32, lr=0.005, seed=5, split_seed=5, max_grad_norm=1.0,
                         num_rounds=2, hidden=(16, 8)).to_config(encoder)
    config.update(plan.to_config())
    config[EVAL_BINS] = metrics.COARSE_N_BINS if dp else metrics.DEFAULT_N_BINS
    context = Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})
    request = SiteRequest(source, site, config, context)
    model = build_model(encoder, site.task, (16, 8), seed=5)
    msg = Message(RecordDict({r.ARRAYS: to_arrays(model), r.CONFIG: config}), dst_node_id=1,
                  message_type=messages.PERSONALISE.type)
    return msg, request
