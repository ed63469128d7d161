"""A resumed run that redoes the personalisation phase charges the site's ledger nothing new (issue 16, item 1):
the phase's DP-SGD fits are tagged per (run, phase, candidate) like the federated rounds' releases, and its noise
comes back from the site's disk, so the redone fits and releases are the same numbers, charged once."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from client import run_state
from client.dp import SiteDP, start_run
from client.personalisation_handlers import PHASE, personalise
from client.site import SiteRequest, SiteSource, load
from client.split import split_site
from shared import metrics
from shared.ann import build_model, to_arrays
from shared.encoding import fit_local
from shared.protocol import messages
from shared.protocol import personalisation as p
from shared.protocol import records as r
from shared.protocol.privacy import RunPlan
from shared.protocol.training import EVAL_BINS, AnnTraining
from simulation.clinics import SitePrivacy, generate_sites

PLAN = RunPlan(("statistics", "training", "evaluation", PHASE))


def _message_and_request(folder, heads, context: Context):
    source = SiteSource(folder, state_dir=heads)
    site = load(source)
    encoder = fit_local(split_site(site.episodes, site.task, 5)["train"], site.task)
    config = AnnTraining(local_epochs=1, batch_size=32, lr=0.005, seed=5, split_seed=5, max_grad_norm=1.0,
                         num_rounds=2, hidden=(16, 8)).to_config(encoder)
    config.update(p.Personalisation(methods=("finetune", "fedper"), epochs=1).to_config())
    config[EVAL_BINS] = metrics.COARSE_N_BINS
    model = build_model(encoder, site.task, (16, 8), seed=5)
    msg = Message(RecordDict({r.ARRAYS: to_arrays(model), r.CONFIG: config}), dst_node_id=1,
                  message_type=messages.PERSONALISE.type)
    return msg, SiteRequest(source, site, config, context)


def _dp_site(tmp_path):
    """One simulated DP site (ε = 3): its folder and the folder of its ledger heads."""
    world = generate_sites(1, 5, tmp_path / "sites", patients_per_clinic=80,
                           privacy=SitePrivacy(dp=True, epsilon=3.0, delta=1e-5))
    return tmp_path / "sites" / world.clinics[0].name, tmp_path / "heads"


def _ledger(folder, heads):
    return SiteDP.of(folder, load(SiteSource(folder, state_dir=heads)).config, state_dir=heads).ledger


def test_a_resumed_run_redoing_the_personalisation_phase_charges_nothing_new(tmp_path, task_identity):
    folder, heads = _dp_site(tmp_path)
    original = Context(run_id=41, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg, request = _message_and_request(folder, heads, original)
    start_run(original, request.dp, PLAN)
    first = p.PersonalisationReply.from_records(personalise(msg, request))
    run_state.keep(original, folder)  # what the site's handler writes after every message
    ledger = _ledger(folder, heads)
    charged = [e for e in ledger.entries if e["phase"] == PHASE]
    assert len(charged) == 3 + 2  # local-only, finetune, fedper; the validation and test releases
    assert all(e.get("release") for e in charged)  # every charge of the phase is tagged
    assert len({int(e["round"]) for e in charged}) == len(charged)  # one place per fit and per release
    spent = ledger.spent()

    # the coordinator restarts: a new Flower run (another id, an empty node state) continuing run 41 redoes
    # the phase; the site answers as run 41 with the phase's noise from its disk
    restarted = run_state.adopt(Context(run_id=99, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                                "41", folder)
    msg, request = _message_and_request(folder, heads, restarted)
    again = p.PersonalisationReply.from_records(personalise(msg, request))
    after = _ledger(folder, heads)
    assert len(after.entries) == len(ledger.entries) and after.spent() == spent  # nothing charged twice
    assert (again.chosen, again.dp_steps, again.summaries) == (first.chosen, first.dp_steps, first.summaries)

    # another run is another release: charged
    other = Context(run_id=42, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg, request = _message_and_request(folder, heads, other)
    start_run(other, request.dp, PLAN)
    personalise(msg, request)
    assert len(_ledger(folder, heads).entries) == len(ledger.entries) + 5


def test_a_redone_fit_that_comes_out_different_is_charged(tmp_path, task_identity):
    """Idempotent only for the same release: a fit redone from another global model is new information."""
    folder, heads = _dp_site(tmp_path)
    context = Context(run_id=41, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg, request = _message_and_request(folder, heads, context)
    start_run(context, request.dp, PLAN)
    personalise(msg, request)
    before = len(_ledger(folder, heads).entries)
    encoder = request.encoder
    other_model = build_model(encoder, request.site.task, (16, 8), seed=6)
    msg = Message(
        RecordDict({r.ARRAYS: to_arrays(other_model), r.CONFIG: request.config}), dst_node_id=1,
        message_type=messages.PERSONALISE.type)
    personalise(msg, request)
    assert len(_ledger(folder, heads).entries) > before
