"""One shape for the site's query handlers: load the site's validated data, answer, or reply an error naming why.

The analytics, histogram-boosting and dose-adjuster queries all answer from the site's own data and may
spend its privacy budget. Each gives :func:`site_query` its ``answer``; the errors are the same everywhere:

- the site's data fail validation → ``ERROR_SITE_DATA``, naming the site;
- the privacy ledger refuses (budget exhausted, ledger unreadable) → ``ERROR_PRIVACY_BUDGET``, "<site> refuses";
- the request itself is malformed (``KeyError``/``ValueError``) → the caller's ``request_error`` code,
  "<site> cannot answer".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message, RecordDict

from client.ledger import BudgetExhausted, LedgerError, PrivacyLedger
from shared.validation import SiteData, SiteDataError

Answer = Callable[[Message, Context, SiteData, "PrivacyLedger | None", str], RecordDict]
"""``answer(msg, context, site, ledger, site_name)`` → the reply's content."""


def site_query(name: str, site_source_fn: Callable[[Context], Any], load_fn: Callable[[Any], SiteData],
               ledger_fn: Callable[[Any, SiteData], PrivacyLedger | None], answer: Answer,
               request_error: int) -> Callable[[Message, Context], Message]:
    """A Flower query handler for ``query.<name>`` answering with ``answer`` from this node's site."""

    def handle(msg: Message, context: Context) -> Message:
        from client.app import ERROR_PRIVACY_BUDGET, ERROR_SITE_DATA, error_reply, site_name

        source = site_source_fn(context)
        try:
            site = load_fn(source)
        except SiteDataError as err:
            return error_reply(msg, ERROR_SITE_DATA, f"{site_name(source)}: {err}")
        who = site_name(source, site)
        try:
            content = answer(msg, context, site, ledger_fn(source, site), who)
        except (BudgetExhausted, LedgerError) as err:
            return error_reply(msg, ERROR_PRIVACY_BUDGET, f"{who} refuses {name}: {err}")
        except (KeyError, ValueError) as err:
            return error_reply(msg, request_error, f"{who} cannot answer {name}: {err}")
        return Message(content, reply_to=msg)

    handle.__name__ = name
    return handle
