"""All SQL of the credits service (SQLAlchemy 2.0 Core over asyncpg), one module per aggregate.

Locking rule that keeps Redis rebuilds exact: every transaction that changes what Redis mirrors for a
user (balance or the set of open holds) locks that user's `accounts` row — `FOR KEY SHARE` at least,
an UPDATE when the balance moves — and a rebuild reads the snapshot under `FOR UPDATE` and loads Redis
before it commits. So a rebuild never loads a snapshot that a concurrent change has already overtaken.
"""
