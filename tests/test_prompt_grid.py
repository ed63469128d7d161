"""The deployed ServerApp's Grid pulls replies within ~0.5 s of their arrival, as Flower's loop but without its
fixed 3 s sleep, and stops at the timeout as Flower's does."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.prompt_grid import MAX_WAIT_S, PromptGrid, prompt

pytestmark = pytest.mark.usefixtures("task_identity")


class SlowSites(Grid):
    """A Grid whose sites answer message i ``delays[i]`` seconds after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays, self.pulls, self.closed = delays, 0, False

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return list(range(len(self.delays)))

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        self.sent = {str(i): m for i, m in enumerate(messages)}
        return list(self.sent)

    def pull_messages(self, message_ids):
        self.pulls += 1
        elapsed = time.monotonic() - self.pushed
        ready = [i for i in message_ids if self.delays[int(i)] <= elapsed]
        replies = []
        for i in ready:
            reply = Message(RecordDict({"config": ConfigRecord({"i": int(i)})}), reply_to=self.sent[i])
            reply.metadata.__dict__["_reply_to_message_id"] = i  # an unsent message has no id of its own
            replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not call the wrapped Grid's fixed-3-s loop")

    def close(self) -> None:
        self.closed = True


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i, message_type="query.x") for i in range(n)]


def test_every_reply_is_seen_soon_after_it_arrives():
    sites = SlowSites([0.0, 0.3, 1.2])
    start = time.monotonic()
    replies = list(PromptGrid(sites).send_and_receive(_messages(3)))
    waited = time.monotonic() - start
    assert sorted(r.content["config"]["i"] for r in replies) == [0, 1, 2]
    assert 1.2 <= waited <= 1.2 + MAX_WAIT_S + 0.3  # Flower's loop: 3.0 s (its second pull)
    assert sites.pulls <= 12  # backing off while nothing comes: not a busy loop


def test_a_timeout_returns_what_came():
    sites = SlowSites([0.0, 30.0])
    start = time.monotonic()
    replies = list(PromptGrid(sites).send_and_receive(_messages(2), timeout=0.4))
    assert [r.content["config"]["i"] for r in replies] == [0]
    assert time.monotonic() - start < 1.0


def test_everything_else_is_the_wrapped_grids():
    sites = SlowSites([0.0])
    grid = prompt(sites)
    assert isinstance(grid, PromptGrid) and list(grid.get_node_ids()) == [0]
    grid.close()
    assert sites.closed
    assert prompt(grid) is grid


def test_the_simulations_grid_is_left_alone():
    grid = InMemoryGrid.__new__(InMemoryGrid)
    assert prompt(grid) is grid
