"""Billing schema: purchases, the Stripe webhook inbox, the outbox.

Revision ID: 0001
Revises:
"""

from alembic import op

from shared.outbox import create_table_sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE purchases (
            purchase_id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            pack TEXT NOT NULL,
            credits BIGINT NOT NULL CHECK (credits > 0),
            unlocks_api BOOLEAN NOT NULL,
            amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
            currency TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('pending', 'paid', 'failed', 'expired', 'refunded', 'partially_refunded')),
            stripe_checkout_session_id TEXT UNIQUE,
            stripe_payment_intent_id TEXT,
            success_url TEXT,
            cancel_url TEXT,
            amount_refunded_cents BIGINT NOT NULL DEFAULT 0,
            credits_refunded BIGINT NOT NULL DEFAULT 0,
            review_reason TEXT,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            paid_at TIMESTAMPTZ
        )
        """
    )
    op.execute("CREATE INDEX purchases_user_created_idx ON purchases (user_id, created_at DESC)")
    op.execute(
        "CREATE INDEX purchases_payment_intent_idx ON purchases (stripe_payment_intent_id) "
        "WHERE stripe_payment_intent_id IS NOT NULL"
    )
    # The inbox: one row per Stripe event id, written in the transaction that processes the event.
    op.execute(
        """
        CREATE TABLE stripe_events (
            event_id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            outcome TEXT NOT NULL,
            purchase_id TEXT,
            stripe_created TIMESTAMPTZ,
            received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            payload JSONB NOT NULL
        )
        """
    )
    for statement in create_table_sql("outbox"):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE outbox")
    op.execute("DROP TABLE stripe_events")
    op.execute("DROP TABLE purchases")
