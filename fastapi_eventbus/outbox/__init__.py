"""A transactional outbox (and an inbox) in the application's own database, with SQLAlchemy.

Needs the ``sqlalchemy`` extra: ``pip install "fastapi-eventbus-di[sqlalchemy]"``. See the
"Events and your database" page of the docs.
"""

from __future__ import annotations

import importlib.util

from fastapi_eventbus.exceptions import MissingExtraError

if importlib.util.find_spec("sqlalchemy") is None:  # pragma: no cover - the extra is missing
    raise MissingExtraError("sqlalchemy", "SQLAlchemy")

from ._inbox import SQLAlchemyInbox
from ._outbox import SQLAlchemyOutbox

__all__ = ["SQLAlchemyInbox", "SQLAlchemyOutbox"]
