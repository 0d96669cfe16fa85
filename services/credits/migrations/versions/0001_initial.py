"""Accounts, the append-only ledger, reservations, purchases, API keys and the outbox."""

from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE accounts (
            user_id text PRIMARY KEY,
            -- Cached sum of this user's ledger entries, updated in the same transaction as every insert.
            balance bigint NOT NULL DEFAULT 0,
            credits_purchased_total bigint NOT NULL DEFAULT 0,
            credits_lifetime_used bigint NOT NULL DEFAULT 0,
            -- Refunded credits that could not be clawed back; later purchases pay this first.
            credits_owed bigint NOT NULL DEFAULT 0,
            api_access_unlocked boolean NOT NULL DEFAULT false,
            tier text NOT NULL DEFAULT 'free',
            tier_credits bigint NOT NULL DEFAULT 0,
            -- Set when credits.balance.low was published; cleared when the balance rises above the threshold.
            low_balance_notified boolean NOT NULL DEFAULT false,
            last_purchase_date timestamptz,
            last_purchase_amount bigint,
            -- Bumped by every transaction that changes the balance; Redis keeps the version it reflects.
            version bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(),
            CHECK (balance >= 0)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE ledger_entries (
            id bigserial PRIMARY KEY,
            user_id text NOT NULL REFERENCES accounts (user_id),
            type text NOT NULL CHECK (type IN ('signup_bonus', 'purchase', 'usage', 'admin_add',
                                               'migration', 'refund_clawback')),
            amount bigint NOT NULL,
            balance_after bigint NOT NULL,
            reference text NOT NULL UNIQUE,
            detail text,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX ledger_entries_user_id_id ON ledger_entries (user_id, id DESC)")
    # Append-only: the table refuses updates and deletes.
    op.execute(
        """
        CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'ledger_entries is append-only';
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER ledger_entries_no_change BEFORE UPDATE OR DELETE ON ledger_entries
        FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()
        """
    )
    op.execute(
        """
        CREATE TABLE reservations (
            id uuid PRIMARY KEY,
            user_id text NOT NULL REFERENCES accounts (user_id),
            amount bigint NOT NULL CHECK (amount > 0),
            idempotency_key text,
            kind text NOT NULL DEFAULT 'usage',
            status text NOT NULL DEFAULT 'held'
                CHECK (status IN ('held', 'committed', 'released', 'expired')),
            charged bigint,
            expires_at timestamptz NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            ended_at timestamptz,
            UNIQUE (user_id, idempotency_key)
        )
        """
    )
    # The sorted set of deadlines that the sweeper walks.
    op.execute("CREATE INDEX reservations_open_deadline ON reservations (expires_at) WHERE status = 'held'")
    op.execute("CREATE INDEX reservations_open_user ON reservations (user_id) WHERE status = 'held'")
    op.execute(
        """
        CREATE TABLE purchases (
            purchase_id text PRIMARY KEY,
            user_id text NOT NULL REFERENCES accounts (user_id),
            pack text NOT NULL,
            credits bigint NOT NULL,
            amount_cents bigint NOT NULL,
            currency text NOT NULL,
            unlocks_api boolean NOT NULL,
            -- Cumulative credits refunded so far, as last reported by billing.
            refunded_credits bigint NOT NULL DEFAULT 0,
            clawed_back bigint NOT NULL DEFAULT 0,
            owed_recorded bigint NOT NULL DEFAULT 0,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX purchases_user_id ON purchases (user_id)")
    op.execute(
        """
        CREATE TABLE api_keys (
            id text PRIMARY KEY,
            user_id text NOT NULL REFERENCES accounts (user_id),
            name text,
            prefix text NOT NULL,
            key_hash text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        )
        """
    )
    op.execute("CREATE INDEX api_keys_user_id ON api_keys (user_id, created_at)")
    op.execute(
        """
        CREATE TABLE outbox (
            id bigserial PRIMARY KEY,
            routing_key text NOT NULL,
            body text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz
        )
        """
    )
    op.execute("CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL")


def downgrade() -> None:
    for table in ("outbox", "api_keys", "purchases", "reservations", "ledger_entries", "accounts"):
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    op.execute("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
