"""Billing's purchases and refunds applied to the ledger, each exactly once (see consumers.py)."""

from __future__ import annotations

from collections.abc import Callable

from services.credits import metrics
from services.credits.accounts import Accounts, write_low_balance_event
from services.credits.mirror import Mirror, Sync
from services.credits.reservations import Reservations
from services.credits.stores import accounts as account_store
from services.credits.stores import ledger_entries as ledger_store
from services.credits.stores import outbox as outbox_store
from services.credits.stores import purchases as purchase_store
from services.credits.stores import reservations as reservation_store
from shared.events import ApiAccessUnlocked, PackPurchased, PackRefunded, PurchaseApplied


class PurchaseNotYetApplied(Exception):
    """A refund arrived before its purchase; the message is retried (and dead-lettered if it never comes)."""


class Purchases:
    def __init__(
        self,
        mirror: Mirror,
        accounts: Accounts,
        reservations: Reservations,
        *,
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self.mirror = mirror
        self.engine, self.clock = mirror.engine, mirror.clock
        self.accounts = accounts
        self.reservations = reservations
        self.threshold = accounts.threshold
        self._on_outbox = on_outbox

    async def apply_purchase(self, event: PackPurchased) -> bool:
        """Credits a purchase exactly once per purchase_id. Returns False for a replay."""
        user_id, purchase_id, credits = event.user_id, event.purchase_id, event.credits
        async with self.engine.begin() as conn:
            created = await self.accounts.create_account(conn, user_id)
            account = await account_store.get_account(conn, user_id, lock="update")
            if await purchase_store.get_purchase(conn, purchase_id) is not None:
                replay = True
                # A redelivery may follow a process that died before syncing Redis: sync it now.
                sync = Sync(user_id, int(account.balance), int(account.version), created=created)
            else:
                replay = False
                await purchase_store.insert_purchase(
                    conn,
                    {
                        "purchase_id": purchase_id,
                        "user_id": user_id,
                        "pack": event.pack,
                        "credits": credits,
                        "amount_cents": event.amount_cents,
                        "currency": event.currency.lower(),
                        "unlocks_api": event.unlocks_api,
                    },
                )
                balance, version, crossed = await ledger_store.change_balance(
                    conn,
                    user_id,
                    credits,
                    "purchase",
                    f"purchase:{purchase_id}",
                    threshold=self.threshold,
                    purchased=credits,
                )
                await account_store.record_pack_purchase(conn, user_id, event.pack, credits, self.clock())
                owed = int(account.credits_owed)
                if owed > 0:
                    # Debt from earlier refunds is paid first out of the new credits (never below zero:
                    # the payment is at most the credits just added).
                    pay = min(owed, credits)
                    balance, version, crossed = await ledger_store.change_balance(
                        conn,
                        user_id,
                        -pay,
                        "refund_clawback",
                        f"debt:{purchase_id}",
                        threshold=self.threshold,
                    )
                    await account_store.add_owed(conn, user_id, -pay)
                remaining = balance - await reservation_store.open_holds_total(conn, user_id)
                await outbox_store.add_outbox(
                    conn,
                    PurchaseApplied(
                        purchase_id=purchase_id, user_id=user_id, credits=credits, credits_remaining=remaining
                    ),
                )
                if event.unlocks_api and await account_store.unlock_api(conn, user_id):
                    await outbox_store.add_outbox(
                        conn, ApiAccessUnlocked(user_id=user_id, purchase_id=purchase_id)
                    )
                if crossed:
                    await write_low_balance_event(conn, user_id, balance, self.threshold)
                sync = Sync(user_id, balance, version, created=created)
        if not replay:
            metrics.PURCHASES_APPLIED.inc()
            self._on_outbox()
        await self.mirror.sync([sync])
        return not replay

    async def apply_refund(self, event: PackRefunded) -> bool:
        """`event.credits` is cumulative for the purchase; claws back the part not yet accounted for.

        The purchase row stays locked from the first read to the commit, so concurrent deliveries of
        refunds for one purchase run one after another. The claw-back takes credits through a hold,
        so it can never race a concurrent reserve into a negative available balance; what is not
        available becomes debt (`credits_owed`).
        """
        async with self.engine.begin() as conn:
            purchase = await purchase_store.get_purchase(conn, event.purchase_id, for_update=True)
            if purchase is None:
                raise PurchaseNotYetApplied(event.purchase_id)
            user_id = purchase.user_id
            cumulative = min(event.credits, int(purchase.credits))
            want = cumulative - int(purchase.refunded_credits)
            if want <= 0:
                return False  # a replay, or a stale (smaller) cumulative value
            reference = f"refund:{event.purchase_id}:{cumulative}"
            # The claw-back takes what Redis shows available: a Redis left behind by a lost sync (the
            # purchase's own, say) would leave spendable credits out and record them as owed instead.
            await self.mirror.catch_up(user_id)
            # The hold is persisted by the hold writer on its own connection (it does not touch the
            # locked purchase). A hold left by an attempt that dies here simply expires.
            hold = await self.reservations.reserve(
                user_id, want, None, ttl_seconds=300, up_to=True, kind="clawback", count_metrics=False
            )
            now = self.clock()
            take = 0
            balance = version = None
            if hold is not None:
                take = hold.reservation.amount
                balance, version, crossed = await ledger_store.change_balance(
                    conn, user_id, -take, "refund_clawback", reference, threshold=self.threshold
                )
                await reservation_store.end_reservation(
                    conn, hold.reservation.id, "committed", now, charged=take
                )
                if crossed:
                    await write_low_balance_event(conn, user_id, balance, self.threshold)
            else:
                await account_store.get_account(conn, user_id, lock="update")
            owed = want - take
            if owed:
                await account_store.add_owed(conn, user_id, owed)
            await purchase_store.update_purchase_refund(conn, event.purchase_id, cumulative, take, owed)
            # Money back, for revenue net of refunds (billing's amount_cents is cumulative too).
            cents = min(event.amount_cents, int(purchase.amount_cents))
            await purchase_store.record_refund_cents(
                conn,
                event.purchase_id,
                cumulative,
                max(cents, int(purchase.refunded_cents)),
                max(cents - int(purchase.refunded_cents), 0),
                now,
            )
            sync = Sync(user_id, balance, version, ended=(hold.reservation.id,) if hold else ())
        metrics.REFUNDS_APPLIED.inc()
        self._on_outbox()
        await self.mirror.sync([sync])
        return True
