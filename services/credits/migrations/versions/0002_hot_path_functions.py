"""Hot-path functions: persisting a batch of holds, committing and releasing a hold, each one round trip.

The rules stay in Python (reservations.py, settlements.py); these functions only make the
multi-statement transactions of the hot path atomic server-side, keeping the locking rule of stores/
(see its __init__): the account row is locked (KEY SHARE for hold changes, an UPDATE when the balance
moves) by every change Redis mirrors.
"""

from alembic import op

revision = "0002"
down_revision = "0001"


# op.execute() reads ":name" as a bind parameter; "\\:" below is a literal colon.


def upgrade() -> None:
    # Bumped by every Redis rebuild of the account (under its row lock) and loaded into Redis as the
    # epoch: a hold whose insert sees the epoch its reserve saw cannot have been missed by a rebuild.
    op.execute("ALTER TABLE accounts ADD COLUMN redis_epoch bigint NOT NULL DEFAULT 0")
    op.execute(
        """
        CREATE FUNCTION credits_insert_holds(
            p_ids uuid[], p_users text[], p_amounts bigint[], p_keys text[], p_kinds text[], p_expires timestamptz[]
        ) RETURNS TABLE (hold_id uuid, epoch bigint) LANGUAGE plpgsql AS $$
        BEGIN
            -- KEY SHARE waits for a rebuild in progress (it holds FOR UPDATE); the epoch read after it
            -- is the one Redis has (or will have) loaded.
            PERFORM 1 FROM accounts a WHERE a.user_id = ANY(p_users) ORDER BY a.user_id FOR KEY SHARE;
            RETURN QUERY
                WITH ins AS (
                    INSERT INTO reservations (id, user_id, amount, idempotency_key, kind, expires_at)
                    SELECT * FROM unnest(p_ids, p_users, p_amounts, p_keys, p_kinds, p_expires)
                    ON CONFLICT DO NOTHING
                    RETURNING reservations.id AS rid, reservations.user_id AS uid
                )
                SELECT ins.rid, a.redis_epoch FROM ins JOIN accounts a ON a.user_id = ins.uid;
        END $$
        """
    )
    # Outcomes: not_found, too_much, replay (already committed), released, expired (already ended),
    # expired_now (found past its deadline: ended here), committed.
    op.execute(
        """
        CREATE FUNCTION credits_commit(
            p_id uuid, p_amount bigint, p_now timestamptz, p_threshold bigint, p_low_event jsonb,
            OUT outcome text, OUT user_id text, OUT amount bigint, OUT charged bigint,
            OUT balance bigint, OUT version bigint, OUT crossed boolean
        ) LANGUAGE plpgsql AS $$
        DECLARE
            r reservations%ROWTYPE;
            v_remaining bigint;
        BEGIN
            crossed := false;
            SELECT * INTO r FROM reservations WHERE id = p_id FOR UPDATE;
            IF NOT FOUND THEN
                outcome := 'not_found';
                RETURN;
            END IF;
            user_id := r.user_id;
            amount := r.amount;
            charged := r.charged;
            IF r.status = 'committed' THEN
                outcome := 'replay';
                RETURN;
            ELSIF r.status <> 'held' THEN
                outcome := r.status;
                RETURN;
            ELSIF r.expires_at <= p_now THEN
                PERFORM 1 FROM accounts a WHERE a.user_id = r.user_id FOR KEY SHARE;
                UPDATE reservations SET status = 'expired', ended_at = p_now WHERE id = p_id;
                outcome := 'expired_now';
                RETURN;
            END IF;
            charged := COALESCE(p_amount, r.amount);
            IF charged > r.amount THEN
                outcome := 'too_much';
                RETURN;
            END IF;
            UPDATE accounts a SET
                balance = a.balance - charged,
                credits_lifetime_used = a.credits_lifetime_used + charged,
                version = a.version + 1,
                low_balance_notified = CASE
                    WHEN a.balance - charged > p_threshold THEN false
                    WHEN charged > 0 AND a.balance - charged <= p_threshold THEN true
                    ELSE a.low_balance_notified END
            WHERE a.user_id = r.user_id
            RETURNING a.balance, a.version INTO balance, version;
            IF charged > 0 THEN
                INSERT INTO ledger_entries (user_id, type, amount, balance_after, reference)
                VALUES (r.user_id, 'usage', -charged, balance, 'reservation:' || p_id || '\\:commit');
            END IF;
            UPDATE reservations SET status = 'committed', charged = credits_commit.charged, ended_at = p_now
            WHERE id = p_id;
            crossed := charged > 0 AND balance + charged > p_threshold AND balance <= p_threshold;
            IF crossed AND p_low_event IS NOT NULL THEN
                SELECT balance - COALESCE(SUM(x.amount), 0) INTO v_remaining
                FROM reservations x WHERE x.user_id = r.user_id AND x.status = 'held';
                INSERT INTO outbox (routing_key, body) VALUES (
                    p_low_event ->> 'event_type',
                    (p_low_event || jsonb_build_object(
                        'user_id', r.user_id, 'credits_remaining', GREATEST(v_remaining, 0)))::text
                );
            END IF;
            outcome := 'committed';
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION credits_release(
            p_id uuid, p_now timestamptz, OUT outcome text, OUT user_id text, OUT amount bigint
        ) LANGUAGE plpgsql AS $$
        DECLARE
            r reservations%ROWTYPE;
        BEGIN
            SELECT * INTO r FROM reservations WHERE id = p_id FOR UPDATE;
            IF NOT FOUND THEN
                outcome := 'not_found';
                RETURN;
            END IF;
            user_id := r.user_id;
            amount := r.amount;
            IF r.status <> 'held' THEN
                outcome := r.status;
                RETURN;
            END IF;
            PERFORM 1 FROM accounts a WHERE a.user_id = r.user_id FOR KEY SHARE;
            UPDATE reservations SET status = 'released', ended_at = p_now WHERE id = p_id;
            outcome := 'released_now';
        END $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS credits_release(uuid, timestamptz)")
    op.execute("DROP FUNCTION IF EXISTS credits_commit(uuid, bigint, timestamptz, bigint, jsonb)")
    op.execute(
        "DROP FUNCTION IF EXISTS credits_insert_holds(uuid[], text[], bigint[], text[], text[], timestamptz[])"
    )
    op.execute("ALTER TABLE accounts DROP COLUMN redis_epoch")
