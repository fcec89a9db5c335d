"""The store: every job, piece, attempt and event; the one place that speaks SQL.

`Store` (facade.py) is the interface the stages use; the statements are named in
queries.sql, the schema is built by ordered migrations/NNNN_*.sql (PRAGMA
user_version), and the engine behind it is a backend (sqlite.py).
"""

from batchd.store.facade import LIVE_STATES, NewJob, Pending, Store
from batchd.store.queries import Conflict, Duplicate, migrations
from batchd.store.rows import Attempt, Event, Job, LiveBatch, Piece

__all__ = [
    "LIVE_STATES",
    "Attempt",
    "Conflict",
    "Duplicate",
    "Event",
    "Job",
    "LiveBatch",
    "NewJob",
    "Pending",
    "Piece",
    "Store",
    "migrations",
]
