"""The FAB's ClientApp (``[tool.flwr.app.components] clientapp``): hands each message to the site's warm worker
when the SuperNode names one, else answers it here with :data:`client.app.app`.

A deployed SuperNode (Flower 1.42) starts one ``flwr-clientapp`` process per message, which imports this module
first: it imports flwr only, so that with a worker (``client.site_worker``; node config ``site-worker``) the
process costs flwr's import and a round trip over a Unix socket instead of the project's, torch's and Opacus'
imports. Without the key, or when the worker cannot be reached or runs other code, the full ClientApp is imported
here and answers, exactly as before the worker existed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.site_worker import NODE_CONFIG_KEY, WorkerUnavailable, forward

LOG = logging.getLogger("fednano.deployed")


class WorkerClientApp(ClientApp):
    """A ClientApp whose every message goes to the worker at the node config's ``site-worker`` socket, or to
    :data:`client.app.app` in this process when there is none or it does not answer."""

    def __call__(self, message: Message, context: Context) -> Message:
        socket_path = context.node_config.get(NODE_CONFIG_KEY)
        if socket_path:
            try:
                reply, answered = forward(Path(str(socket_path)), message, context)
            except (OSError, WorkerUnavailable) as err:
                LOG.warning("site worker at %s not answering (%s): answering in this process", socket_path,
                            err if isinstance(err, WorkerUnavailable) else type(err).__name__)
            else:
                context.state = answered.state  # what Flower keeps as the node state for the next message
                return reply
        from client.app import app as full_app  # the project's imports, paid by this process

        return full_app(message, context)


app = WorkerClientApp()
