"""`overage_charges`: one row per hold whose overage (the credits its request cost beyond it) was charged,
written in the transaction that charges it. It is the overage's idempotency record: a commit delivered
again (its answer lost, or its process killed before the overage was charged) charges the overage only
when the hold has no row, and an overage the balance could not cover at all (all of it owed, so no
ledger entry) is recorded too.

Backfilled from the overage ledger entries written before it (reference `reservation:<id>:overage`):
those record only what was taken, so `credits` = `taken` and `owed` = 0 there.
"""

from alembic import op

revision = "0008_overage_charges"
down_revision = "0007_shared_outbox"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE overage_charges (
            reservation_id uuid PRIMARY KEY,
            user_id text NOT NULL REFERENCES accounts (user_id),
            credits bigint NOT NULL,
            taken bigint NOT NULL,
            owed bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        INSERT INTO overage_charges (reservation_id, user_id, credits, taken, owed, created_at)
        SELECT split_part(reference, ':', 2)::uuid, user_id, -amount, -amount, 0, created_at
        FROM ledger_entries
        WHERE reference LIKE 'reservation:%' AND split_part(reference, ':', 3) = 'overage'
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE overage_charges")
