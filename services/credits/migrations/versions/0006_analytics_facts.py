"""Analytics facts kept ahead of the request, so no request passes over every account or purchase.

- `account_tiers`: users per current tier, kept by triggers in the transaction that inserts or
  deletes accounts (per statement) or changes a tier (per row, `UPDATE OF tier`: the balance updates
  of the hot path do not fire it).
- Whole UTC days rolled up by `credits_roll_up_ledger()` next to `ledger_daily` (same state row,
  same "ended more than an hour ago" rule): `signups_daily` (accounts created), `purchases_daily`
  (per pack: sold, cents, refunded cents), `buyers_daily` (distinct payers, users whose first and
  whose second purchase fell on the day) and `purchase_gaps` (per repeat purchase, the days since
  the same user's previous one, for the median). Analytics reads whole days from these and the
  rest from the base tables by their date indexes, as for the ledger.
- `rolled_through` NULL means nothing summed yet: the next roll-up empties the daily tables and
  sums every day again (backfill after this migration; tests that rewrite timestamps).
"""

from alembic import op

revision = "0006_analytics_facts"
down_revision = "0005_w15"

DAILY_TABLES = ("signups_daily", "purchases_daily", "buyers_daily", "purchase_gaps")


def _roll_up_function(*, facts: bool) -> str:
    """credits_roll_up_ledger() of 0005; with `facts`, it also rolls up accounts and purchases."""
    start = (
        """
                SELECT least(
                    (SELECT min(created_at) FROM ledger_entries), (SELECT min(created_at) FROM accounts),
                    (SELECT min(applied_at) FROM purchases), (SELECT min(refunded_at) FROM purchase_refunds)
                ) INTO v_first;
                v_done := (v_first AT TIME ZONE 'UTC')::date - 1;
                DELETE FROM ledger_daily;
                DELETE FROM signups_daily;
                DELETE FROM purchases_daily;
                DELETE FROM buyers_daily;
                DELETE FROM purchase_gaps;
        """
        if facts
        else """
                SELECT (min(created_at) AT TIME ZONE 'UTC')::date - 1 INTO v_done FROM ledger_entries;
        """
    )
    more = (
        """
                INSERT INTO signups_daily
                SELECT (a.created_at AT TIME ZONE 'UTC')::date, count(*)
                FROM accounts a WHERE a.created_at >= v_lo AND a.created_at < v_hi
                GROUP BY 1;
                INSERT INTO purchases_daily
                SELECT day, pack, sum(sold), sum(cents), sum(refunded)
                FROM (
                    SELECT (p.applied_at AT TIME ZONE 'UTC')::date AS day, p.pack, 1 AS sold,
                           p.amount_cents AS cents, 0 AS refunded
                    FROM purchases p WHERE p.applied_at >= v_lo AND p.applied_at < v_hi
                    UNION ALL
                    SELECT (r.refunded_at AT TIME ZONE 'UTC')::date, p.pack, 0, 0, r.cents
                    FROM purchase_refunds r JOIN purchases p ON p.purchase_id = r.purchase_id
                    WHERE r.refunded_at >= v_lo AND r.refunded_at < v_hi
                ) x
                GROUP BY 1, 2;
                INSERT INTO buyers_daily
                SELECT (p.applied_at AT TIME ZONE 'UTC')::date, count(DISTINCT p.user_id),
                       count(*) FILTER (WHERE e.earlier = 0), count(*) FILTER (WHERE e.earlier = 1)
                FROM purchases p
                CROSS JOIN LATERAL (
                    SELECT count(*) AS earlier FROM (
                        SELECT 1 FROM purchases q
                        WHERE q.user_id = p.user_id AND (q.applied_at, q.purchase_id) < (p.applied_at, p.purchase_id)
                        LIMIT 2
                    ) two
                ) e
                WHERE p.applied_at >= v_lo AND p.applied_at < v_hi
                GROUP BY 1;
                INSERT INTO purchase_gaps
                SELECT (p.applied_at AT TIME ZONE 'UTC')::date, extract(epoch FROM p.applied_at - prev.applied_at) / 86400
                FROM purchases p
                CROSS JOIN LATERAL (
                    SELECT q.applied_at FROM purchases q
                    WHERE q.user_id = p.user_id AND (q.applied_at, q.purchase_id) < (p.applied_at, p.purchase_id)
                    ORDER BY q.applied_at DESC, q.purchase_id DESC LIMIT 1
                ) prev
                WHERE p.applied_at >= v_lo AND p.applied_at < v_hi;
        """
        if facts
        else ""
    )
    return f"""
        CREATE OR REPLACE FUNCTION credits_roll_up_ledger() RETURNS date LANGUAGE plpgsql AS $$
        DECLARE
            v_through date := ((now() - interval '1 hour') AT TIME ZONE 'UTC')::date - 1;
            v_done date;
            v_first timestamptz;
            v_lo timestamptz;
            v_hi timestamptz;
        BEGIN
            SELECT rolled_through INTO v_done FROM ledger_daily_state;
            IF v_done >= v_through THEN
                RETURN v_done;
            END IF;
            SELECT rolled_through INTO v_done FROM ledger_daily_state FOR UPDATE;
            IF v_done >= v_through THEN
                RETURN v_done;
            END IF;
            IF v_done IS NULL THEN
                {start}
            END IF;
            IF v_done IS NOT NULL AND v_done < v_through THEN
                v_lo := (v_done + 1)::timestamp AT TIME ZONE 'UTC';
                v_hi := (v_through + 1)::timestamp AT TIME ZONE 'UTC';
                INSERT INTO ledger_daily
                SELECT (e.created_at AT TIME ZONE 'UTC')::date, e.type,
                       COALESCE(e.details ->> 'operation', ''), COALESCE(e.details ->> 'model', ''),
                       count(*), sum(e.amount),
                       COALESCE(sum(-e.amount) FILTER (WHERE e.details ->> 'upstream_cost_usd' IS NOT NULL), 0),
                       COALESCE(sum((e.details ->> 'upstream_cost_usd')::numeric), 0)
                FROM ledger_entries e
                WHERE e.created_at >= v_lo AND e.created_at < v_hi
                GROUP BY 1, 2, 3, 4;
                {more}
            END IF;
            UPDATE ledger_daily_state SET rolled_through = v_through;
            RETURN v_through;
        END $$
    """


def upgrade() -> None:
    op.execute("CREATE TABLE account_tiers (tier text PRIMARY KEY, users bigint NOT NULL)")
    # Inserts and deletes per statement (one upsert per tier, however many rows: a bulk insert
    # would otherwise update the same counter row once per account in one transaction).
    op.execute(
        """
        CREATE FUNCTION credits_count_new_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO account_tiers (tier, users)
            SELECT tier, count(*) FROM new_accounts GROUP BY tier
            ON CONFLICT (tier) DO UPDATE SET users = account_tiers.users + excluded.users;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION credits_count_gone_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE account_tiers t SET users = t.users - g.users
            FROM (SELECT tier, count(*) AS users FROM gone_accounts GROUP BY tier) g WHERE g.tier = t.tier;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER accounts_count_new AFTER INSERT ON accounts REFERENCING NEW TABLE AS new_accounts "
        "FOR EACH STATEMENT EXECUTE FUNCTION credits_count_new_accounts()"
    )
    op.execute(
        "CREATE TRIGGER accounts_count_gone AFTER DELETE ON accounts REFERENCING OLD TABLE AS gone_accounts "
        "FOR EACH STATEMENT EXECUTE FUNCTION credits_count_gone_accounts()"
    )
    # A tier change per row, only when `tier` is named in the UPDATE and changes (a purchase moves
    # a tier at most once; the balance updates of the hot path do not name it, so do not fire it).
    # A statement-level trigger needs transition tables, which fire for every UPDATE of accounts.
    op.execute(
        """
        CREATE FUNCTION credits_count_tier_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE account_tiers SET users = users - 1 WHERE tier = OLD.tier;
            INSERT INTO account_tiers (tier, users) VALUES (NEW.tier, 1)
            ON CONFLICT (tier) DO UPDATE SET users = account_tiers.users + 1;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER accounts_count_tier_change AFTER UPDATE OF tier ON accounts "
        "FOR EACH ROW WHEN (OLD.tier IS DISTINCT FROM NEW.tier) EXECUTE FUNCTION credits_count_tier_change()"
    )
    op.execute("LOCK TABLE accounts IN SHARE MODE")
    op.execute("INSERT INTO account_tiers SELECT tier, count(*) FROM accounts GROUP BY tier")
    op.execute("CREATE TABLE signups_daily (day date PRIMARY KEY, users bigint NOT NULL)")
    op.execute(
        """
        CREATE TABLE purchases_daily (
            day date NOT NULL,
            pack text NOT NULL,
            sold bigint NOT NULL,
            cents bigint NOT NULL,
            refunded_cents bigint NOT NULL,  -- refunded that day, of purchases of any day
            PRIMARY KEY (day, pack)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE buyers_daily (
            day date PRIMARY KEY,
            payers bigint NOT NULL,         -- distinct users who bought that day
            first_buyers bigint NOT NULL,   -- users whose first purchase was that day
            second_buyers bigint NOT NULL   -- users whose second purchase was that day
        )
        """
    )
    op.execute("CREATE TABLE purchase_gaps (day date NOT NULL, days numeric NOT NULL)")
    op.execute("CREATE INDEX purchase_gaps_day ON purchase_gaps (day)")
    op.execute(_roll_up_function(facts=True))
    # Backfill: the next roll-up (the sweeper's at start, or the first analytics call) sums every day.
    op.execute("UPDATE ledger_daily_state SET rolled_through = NULL")


def downgrade() -> None:
    op.execute(_roll_up_function(facts=False))
    op.execute("DELETE FROM ledger_daily")
    op.execute("UPDATE ledger_daily_state SET rolled_through = NULL")
    op.execute("DROP TRIGGER IF EXISTS accounts_count_tier_change ON accounts")
    op.execute("DROP TRIGGER IF EXISTS accounts_count_gone ON accounts")
    op.execute("DROP TRIGGER IF EXISTS accounts_count_new ON accounts")
    for function in (
        "credits_count_tier_change",
        "credits_count_gone_accounts",
        "credits_count_new_accounts",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    for table in (*DAILY_TABLES, "account_tiers"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
