"""simulation.flower_runtime hands out what Flower 1.42's own loop hands out, in the same order."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from simulation import flower_runtime
from simulation.flower_runtime import next_messages, one_pass_delivery


@pytest.fixture()
def task_identity(monkeypatch):
    for name, value in (("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):  # the server's messages
        monkeypatch.setattr(TaskIdentity, name, value)


def state_with_messages() -> tuple:
    """An in-memory link state as run_simulation sets it up: 5 nodes, a run, and messages pushed through the grid
    (numbered 0-4 in their content: two for node 0, none for node 3, and no. 4 for node 4 expired)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = list(_register_nodes(num_nodes=5, state_factory=factory))
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 3, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[3] = Task(task_id=3, run_id=7)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    sent = [Message(RecordDict({"c": ConfigRecord({"n": n})}), dst_node_id=nodes[node], message_type="train",
                    ttl=30) for n, node in enumerate((2, 0, 1, 0, 4))]
    grid.push_messages(sent)
    sent[-1].metadata.__dict__["_created_at"] -= 60  # past its time to live
    return state, nodes


def flower_pass(state, nodes) -> list[Message]:
    """One pass of Flower's own loop (add_messages_to_queue's body)."""
    return [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]


def handed(messages, nodes) -> list[tuple[int, int]]:
    """(node index, message number) of each message handed out."""
    return [(nodes.index(m.metadata.dst_node_id), m.content["c"]["n"]) for m in messages]


def test_one_pass_hands_out_what_flowers_loop_does_in_the_same_order(task_identity):
    (state, nodes), (twin, twin_nodes) = state_with_messages(), state_with_messages()
    passes = []
    for _ in range(3):  # node 0's second message comes in the second pass; then nothing is left
        ours = next_messages(state, nodes)
        assert handed(ours, nodes) == handed(flower_pass(twin, twin_nodes), twin_nodes)
        assert all(m.metadata.delivered_at for m in ours)
        passes.append(handed(ours, nodes))
    assert passes == [[(0, 1), (1, 2), (2, 0)], [(0, 3)], []]
    assert len(state.message_ins_store) == len(twin.message_ins_store) == 4  # the expired one dropped by both


def test_the_loop_is_replaced_only_inside_the_block_and_only_for_the_version_written_for(monkeypatch):
    from flwr.superlink.grid import InMemoryGrid

    flowers = vce_api.add_messages_to_queue
    with one_pass_delivery() as applied:
        assert applied and vce_api.add_messages_to_queue is not flowers
    assert vce_api.add_messages_to_queue is flowers
    with one_pass_delivery(10):  # ten nodes: replies pulled every 0.01 s; 1,000: every 0.1 s, as Flower
        assert InMemoryGrid.__init__.__defaults__ == (0.01,)
    with one_pass_delivery(1000):
        assert InMemoryGrid.__init__.__defaults__ == (0.1,)
    assert InMemoryGrid.__init__.__defaults__ == (0.1,) and flower_runtime.poll_interval(300) == pytest.approx(0.03)
    monkeypatch.setattr(flower_runtime.flwr, "__version__", "1.43.0")
    with one_pass_delivery() as applied:
        assert not applied and vce_api.add_messages_to_queue is flowers


def test_the_simulated_client_app_travels_as_a_small_recipe_and_is_built_once_per_process(tmp_path):
    from pathlib import Path

    from ray import cloudpickle

    from client.app import SimulatedClientApp, make_client_app
    from client.site import SiteSource

    sites = [SiteSource(Path(tmp_path / f"clinic_{i:03d}")) for i in range(300)]
    app = make_client_app(sites)
    assert isinstance(app, SimulatedClientApp)
    sent = cloudpickle.dumps(app)
    assert len(sent) < 20_000  # the handlers (closures) are not in it; the sites are one blob
    first, again = cloudpickle.loads(sent), cloudpickle.loads(sent)
    assert first is again and first is not app  # one app per process and token
    assert first.recipe[0] == app.recipe[0] and first._registered_funcs.keys() == app._registered_funcs.keys()


def test_a_ray_head_whose_port_accepts_passes_the_check_and_ipv6_brackets_are_read():
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert flower_runtime.ray_head_problem(f"127.0.0.1:{listening.getsockname()[1]}") is None
    assert "expected HOST:PORT" in flower_runtime.ray_head_problem("[::1]")
    assert "expected HOST:PORT" in flower_runtime.ray_head_problem(":6379")


@pytest.mark.slow
def test_simulations_in_one_ray_session_share_ray_and_the_actors_and_train_the_same_model(tmp_path):
    import ray

    from client.site import SiteSource
    from simulation.clinics import SitePrivacy, generate_sites
    from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation

    flower_environment(tmp_path)
    quiet_flower()
    generate_sites(2, seed=3, out=tmp_path / "sites", privacy=SitePrivacy(dp=False))
    sources = [SiteSource(tmp_path / "sites" / f"clinic_{i:02d}") for i in range(2)]

    def federation(name: str) -> dict:
        cfg = ExperimentConfig(out=tmp_path / name, rounds=2, seed=3, models="ann", dp=False, compare=False)
        return run_federation(cfg, sources).models["ann"].final["overall"]

    pools = []
    with flower_runtime.ray_session() as applied:
        assert applied
        finals = []
        for name in ("first", "second"):
            finals.append(federation(name))
            assert ray.is_initialized()  # Flower's terminate did not shut the session's Ray down
            pools.append(flower_runtime._SESSION.pool)
        with flower_runtime.ray_session() as nested:  # an inner session is the outer one
            assert nested and flower_runtime._SESSION.pool is pools[0]
    assert pools[0] is not None and pools[0] is pools[1] and pools[0].num_actors == 2
    assert not ray.is_initialized() and flower_runtime._SESSION is None
    from simulation.flower_runtime import _FLOWER_BUILD, RayBackend
    assert RayBackend.build is _FLOWER_BUILD
    for outcome in ("response", "toxicity_grade3"):  # same model: FedAvg's sum order may move the last digits
        assert finals[0][outcome]["auc"] == pytest.approx(finals[1][outcome]["auc"], abs=1e-9)
    assert finals[0]["response"]["n"] == finals[1]["response"]["n"] > 0
