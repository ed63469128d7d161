"""The deployed ServerApp's Grid, pulling replies promptly instead of every 3 s.

Flower 1.42's deployed Grid (``flwr.superlink.grid.http_grid``) pushes a round's messages, then pulls the replies
and, while some are missing, sleeps a fixed 3 s between pulls: every exchange ends up to 3 s (1.5 s on average)
after its last reply arrived, and a phase of many exchanges (the site check, statistics, every boosting level)
pays it each time. :class:`PromptGrid` runs the same loop on the Grid's own public calls (``push_messages``,
``pull_messages``) with a short sleep that grows while nothing arrives (:data:`FIRST_WAIT_S` doubling to
:data:`MAX_WAIT_S`), so a reply is seen within ~0.5 s of its arrival and an idle wait costs a pull every 0.5 s.
Every other call goes to the wrapped Grid unchanged. The in-process simulation's Grid has its own pull interval
(``simulation.flower_runtime.poll_interval``) and is not wrapped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

FIRST_WAIT_S = 0.05
"""The first sleep between two pulls that found a reply missing."""
MAX_WAIT_S = 0.5
"""The longest sleep between two pulls (Flower's is 3 s)."""


class PromptGrid(Grid):
    """``grid`` with a prompter ``send_and_receive`` (module docstring); everything else is ``grid``'s."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all came or ``timeout`` seconds passed (None: no limit),
        as Flower's loop, sleeping :data:`FIRST_WAIT_S` to :data:`MAX_WAIT_S` between pulls."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_WAIT_S
        while waiting and (end is None or time.monotonic() < end):
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            wait = FIRST_WAIT_S if pulled else min(2 * wait, MAX_WAIT_S)
            time.sleep(wait if end is None else max(0.0, min(wait, end - time.monotonic())))
        return replies

    def __getattr__(self, name: str):  # anything else a Grid offers (close, ...) is the wrapped Grid's
        return getattr(self.grid, name)


def prompt(grid: Grid) -> Grid:
    """``grid`` wrapped in a :class:`PromptGrid`, unless it is the in-process simulation's Grid (or wrapped)."""
    return grid if isinstance(grid, InMemoryGrid | PromptGrid) else PromptGrid(grid)
