"""The outbox keeps the request id of the change it reports, so the published event carries it onward
(a request id follows a purchase from the Stripe webhook through billing and credits to its events)."""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.execute("ALTER TABLE outbox ADD COLUMN request_id TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox DROP COLUMN request_id")
