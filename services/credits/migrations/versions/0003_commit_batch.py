"""credits_commit_batch: many commits in one call (group commit of the commit path)."""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # Commits run in (user_id, reservation id) order, so concurrent batches (several processes) lock
    # reservations and accounts in the same order and cannot deadlock one another. Rows come back in
    # that order, keyed by reservation_id.
    op.execute(
        """
        CREATE FUNCTION credits_commit_batch(
            p_ids uuid[], p_amounts bigint[], p_now timestamptz, p_threshold bigint, p_low_events jsonb[]
        ) RETURNS TABLE (
            reservation_id uuid, outcome text, user_id text, amount bigint, charged bigint,
            balance bigint, version bigint, crossed boolean
        ) LANGUAGE plpgsql AS $$
        DECLARE
            q record;
            c record;
        BEGIN
            FOR q IN
                SELECT b.id, b.amount, b.low_event
                FROM unnest(p_ids, p_amounts, p_low_events) WITH ORDINALITY AS b(id, amount, low_event, n)
                LEFT JOIN reservations r ON r.id = b.id
                ORDER BY r.user_id NULLS FIRST, b.id, b.n
            LOOP
                SELECT * INTO c FROM credits_commit(q.id, q.amount, p_now, p_threshold, q.low_event);
                reservation_id := q.id;
                outcome := c.outcome;
                user_id := c.user_id;
                amount := c.amount;
                charged := c.charged;
                balance := c.balance;
                version := c.version;
                crossed := c.crossed;
                RETURN NEXT;
            END LOOP;
        END $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS credits_commit_batch(uuid[], bigint[], timestamptz, bigint, jsonb[])")
