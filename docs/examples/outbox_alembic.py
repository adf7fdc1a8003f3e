"""The lines of Alembic's env.py that give it the outbox's tables (docs/database.md).

``alembic init -t async migrations`` writes ``migrations/env.py`` with ``target_metadata =
None``; these lines replace it. Here the models' module is docs/examples/outbox.py, imported as
``outbox``; in your project, import your own. Tested: tests/test_docs_outbox.py and
tests/test_docs_outbox_alembic.py.
"""

# --8<-- [start:env]
# migrations/env.py
from outbox import Base  # your models' module: importing it creates the SQLAlchemyOutbox

target_metadata = Base.metadata  # your tables, and eventbus_outbox and eventbus_outbox_dead
# --8<-- [end:env]
