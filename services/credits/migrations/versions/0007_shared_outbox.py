"""Credits' outbox takes the layout of `shared/outbox.py` (`create_table_sql`), billing's, so one relay
publishes both: `event_id` (the message id) and `headers` (the request id) as columns, `body` as jsonb,
`sent_at` instead of `published_at`, and the relay's `attempts` / `last_error`.

Rows are carried over, published or not: a pending row keeps its id (its place in line), its event id
(from its body) and its request id (now the `x-request-id` header). `credits_commit`, the hot-path
function that writes `credits.balance.low`, is rewritten in place to insert the new columns: only that
statement of the installed definition changes, and the downgrade puts the old statement back.
"""

from alembic import op

revision = "0007_shared_outbox"
down_revision = "0006_analytics_facts"

COMMIT_FUNCTION = "credits_commit(uuid, bigint, timestamptz, bigint, jsonb, jsonb)"

# credits_commit's outbox insert as migration 0005 wrote it, and in the shared layout.
OLD_LOW_EVENT_INSERT = """
                INSERT INTO outbox (routing_key, body) VALUES (
                    p_low_event ->> 'event_type',
                    (p_low_event || jsonb_build_object(
                        'user_id', r.user_id, 'credits_remaining', GREATEST(v_remaining, 0)))::text
                );
"""
NEW_LOW_EVENT_INSERT = """
                INSERT INTO outbox (event_id, routing_key, body) VALUES (
                    (p_low_event ->> 'event_id')::uuid,
                    p_low_event ->> 'event_type',
                    p_low_event || jsonb_build_object(
                        'user_id', r.user_id, 'credits_remaining', GREATEST(v_remaining, 0))
                );
"""


def _rewrite_commit_function(old: str, new: str) -> None:
    bind = op.get_bind()
    definition = bind.exec_driver_sql(
        f"SELECT pg_get_functiondef('{COMMIT_FUNCTION}'::regprocedure)"
    ).scalar_one()
    if definition.count(old) != 1:
        raise RuntimeError(f"{COMMIT_FUNCTION} is not the definition this migration rewrites")
    # pg_get_functiondef returns a CREATE OR REPLACE statement; run as is (no bind parameters).
    bind.exec_driver_sql(definition.replace(old, new))


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE outbox
            ADD COLUMN event_id uuid,
            ADD COLUMN headers jsonb NOT NULL DEFAULT '{}'::jsonb,
            ADD COLUMN attempts integer NOT NULL DEFAULT 0,
            ADD COLUMN last_error text,
            ALTER COLUMN body TYPE jsonb USING body::jsonb
        """
    )
    # The old relay sent the body's event_id as the message id, and a request id only when not empty.
    op.execute(
        """
        UPDATE outbox SET
            event_id = (body ->> 'event_id')::uuid,
            headers = CASE WHEN request_id <> '' THEN jsonb_build_object('x-request-id', request_id)
                           ELSE '{}'::jsonb END,
            attempts = CASE WHEN published_at IS NULL THEN 0 ELSE 1 END
        """
    )
    op.execute(
        """
        ALTER TABLE outbox
            DROP COLUMN request_id,
            ALTER COLUMN event_id SET NOT NULL,
            ADD CONSTRAINT outbox_event_id_key UNIQUE (event_id)
        """
    )
    op.execute("ALTER TABLE outbox RENAME COLUMN published_at TO sent_at")
    op.execute("DROP INDEX outbox_unpublished")
    op.execute("CREATE INDEX outbox_pending_idx ON outbox (id) WHERE sent_at IS NULL")
    _rewrite_commit_function(OLD_LOW_EVENT_INSERT, NEW_LOW_EVENT_INSERT)


def downgrade() -> None:
    _rewrite_commit_function(NEW_LOW_EVENT_INSERT, OLD_LOW_EVENT_INSERT)
    op.execute("DROP INDEX outbox_pending_idx")
    op.execute("ALTER TABLE outbox RENAME COLUMN sent_at TO published_at")
    op.execute("ALTER TABLE outbox ADD COLUMN request_id text")
    op.execute("UPDATE outbox SET request_id = headers ->> 'x-request-id'")
    op.execute(
        """
        ALTER TABLE outbox
            DROP CONSTRAINT outbox_event_id_key,
            DROP COLUMN event_id,
            DROP COLUMN headers,
            DROP COLUMN attempts,
            DROP COLUMN last_error,
            ALTER COLUMN body TYPE text USING body::text
        """
    )
    op.execute("CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL")
