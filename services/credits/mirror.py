"""Keeping Redis in line with PostgreSQL: the mirror of each user's balance and open holds.

PostgreSQL is the truth (an append-only ledger; `accounts.balance` caches its sum in the same
transaction). Redis (see holds.py) mirrors balance and open holds so that a reserve is one atomic script.
Every change is: PostgreSQL transaction first, then the Redis mirror is brought in line by version
(balances) and membership (holds), which makes late, repeated or reordered syncs harmless. A mirror
that is missing, behind or whose sync failed is rebuilt from PostgreSQL here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from services.credits import metrics
from services.credits.clock import Clock, ms
from services.credits.holds import Holds
from services.credits.stores import accounts as account_store
from services.credits.stores import reservations as reservation_store
from shared.errors import NotFound, ServiceUnavailable
from shared.holds.protocol import Snapshot

log = logging.getLogger("credits.mirror")


@dataclass
class Sync:
    """What to tell Redis after a PostgreSQL commit."""

    user_id: str
    balance: int | None = None
    version: int | None = None
    ended: tuple[str, ...] = ()
    created: bool = False


async def _pending_not_wired(user_id: str) -> object:
    # A rebuild that skipped the pending hash would hand the credits of holds proxies placed back to
    # the balance: a mirror without its drain must fail loudly, not rebuild quietly.
    raise RuntimeError("Mirror.drain_pending is not set (the runtime wires it)")


class Mirror:
    def __init__(self, engine: AsyncEngine, holds: Holds, clock: Clock) -> None:
        self.engine = engine
        self.holds = holds
        self.clock = clock
        # Applies what proxies left in a user's pending hash (PendingSettlements.drain_pending); set
        # by the runtime, which builds that after the mirror it uses.
        self.drain_pending: Callable[[str], Awaitable[object]] = _pending_not_wired
        self._rebuilds: dict[str, asyncio.Future[None]] = {}
        self._caught_up_at: dict[str, float] = {}  # user -> monotonic time of the last catch_up look
        self._failed_syncs: set[str] = set()  # users whose Redis sync failed, for the sweeper to rebuild

    async def rebuild(self, user_id: str, *, force: bool = False, if_behind: bool = False) -> None:
        """Loads a user's Redis state from PostgreSQL under the account row lock (coalesced per process).
        Without `force`, only a missing mirror is loaded; with `if_behind`, only a mirror missing or
        behind the account version (checked under the lock, so a sync that landed meanwhile spares
        the rebuild)."""
        running = self._rebuilds.get(user_id)
        if running is not None and not (force or if_behind):
            await asyncio.shield(running)
            return
        # Holds a proxy placed in Redis but could not get recorded here are in the user's pending
        # hash: into PostgreSQL with them first, or the rebuild would hand their credits back. (Before
        # this rebuild is registered: applying them may itself need the account loaded.)
        await self.drain_pending(user_id)
        running = self._rebuilds.get(user_id)
        if running is not None and not (force or if_behind):
            await asyncio.shield(running)  # started while the pending records were read
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rebuilds[user_id] = future
        try:
            async with self.engine.begin() as conn:
                row = await account_store.get_account(conn, user_id, lock="update")
                if row is None:
                    raise NotFound(f"Unknown user {user_id!r}.")
                if if_behind:
                    loaded_version = await self.holds.version(user_id)
                    load = loaded_version is None or loaded_version < int(row.version)
                else:
                    load = force or not await self.holds.is_loaded(user_id)
                if load:
                    epoch = await account_store.next_redis_epoch(conn, user_id)
                    # A hold past its deadline plus the grace period can no longer be committed; the
                    # sweeper ends it in PostgreSQL. Loaded, the scripts would meet it as dead and
                    # drop the account again, round after round.
                    alive_from = ms(self.clock()) - self.holds.grace_ms
                    open_holds = [
                        h for h in await reservation_store.open_holds(conn, user_id) if h[3] >= alive_from
                    ]
                    await self.holds.load(user_id, int(row.balance), int(row.version), epoch, open_holds)
                    metrics.REDIS_REBUILDS.inc()
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            if self._rebuilds.get(user_id) is future:
                del self._rebuilds[user_id]

    async def live(self, user_id: str) -> tuple[int, int]:
        """(available, held) from Redis, rebuilding a missing mirror first."""
        snap = await self.snapshot(user_id)
        return snap.available, snap.held

    async def snapshot(self, user_id: str) -> Snapshot:
        for _ in range(5):
            snap = await self.holds.snapshot(user_id, ms(self.clock()))
            if snap is not None:
                return snap
            await self.rebuild(user_id)
        raise ServiceUnavailable("Could not load the balance; try again.")

    async def catch_up(self, user_id: str, *, at_most_every: float = 0.0) -> bool:
        """Rebuilds the user's Redis state when it is behind PostgreSQL's account version: a sync after
        a commit that never came (the process died in between, or Redis failed just then) would show
        only at the user's next balance change. Such a lapse only ever under-states the credits (a
        lost commit sync leaves its hold counted), so the callers are where that shows: a refused
        reserve, the account read, a refund's claw-back. Returns True when Redis was behind (and is now rebuilt).
        `at_most_every` (seconds) bounds how often one user's refused reserves may look, so a user
        out of credits costs no PostgreSQL read per attempt. Errors are logged, never raised: the
        caller's own answer stands."""
        if at_most_every:
            now = time.monotonic()
            if now - self._caught_up_at.get(user_id, -at_most_every) < at_most_every:
                return False
            if len(self._caught_up_at) >= 10_000:
                self._caught_up_at.clear()  # forgetting only lets some users look once more
            self._caught_up_at[user_id] = now
        try:
            # PostgreSQL first: a commit landing after this read cannot make Redis look behind (only
            # a sync still on its way can, and the rebuild checks again under the lock).
            async with self.engine.connect() as conn:
                found = (await account_store.balances_of(conn, [user_id])).get(user_id)
            if found is None:
                return False
            snap = await self.holds.snapshot(user_id, ms(self.clock()))
            if snap is None:
                return True  # just dropped (a hold past its deadline): the caller's retry rebuilds it
            if found[1] <= snap.version:
                return False
            log.warning(
                "Redis was behind PostgreSQL for %s (version %d < %d)", user_id, snap.version, found[1]
            )
            metrics.REDIS_CAUGHT_UP.inc()
            # Rebuilt rather than handed the new balance: when the lost sync was a commit's, its hold
            # is still counted in Redis, and the new balance alone would count the charge twice.
            await self.rebuild(user_id, if_behind=True)
            return True
        except Exception:
            log.exception("checking the Redis state of %s against PostgreSQL failed", user_id)
            return False

    async def resync_failed(self) -> int:
        """Rebuilds the users whose Redis sync failed (Redis unreachable just then); run by the
        sweeper. A failed sync may have been a commit's, whose hold a later sync would not end."""
        users, self._failed_syncs = list(self._failed_syncs), set()
        for i, user_id in enumerate(users):
            try:
                await self.rebuild(user_id, force=True)
            except NotFound:
                pass
            except Exception:
                self._failed_syncs.update(users[i:])  # Redis still failing: the next pass tries again
                raise
        return len(users)

    def sync_failed(self, user_ids: Iterable[str]) -> None:
        """PostgreSQL has changes these users' Redis state missed: the sweeper rebuilds it."""
        self._failed_syncs.update(user_ids)

    async def sync(self, syncs: Sequence[Sync]) -> None:
        for s in syncs:
            try:
                if s.created:
                    # A new account: overwrite whatever a previous life of this user id left in Redis.
                    await self.rebuild(s.user_id, force=True)
                else:
                    await self.holds.apply(s.user_id, balance=s.balance, version=s.version, ended=s.ended)
            except NotFound:
                raise
            except Exception:
                # PostgreSQL has the change; the sweeper rebuilds this user's Redis state. Meanwhile
                # Redis only under-states (a hold still counted, credits added not yet shown).
                self._failed_syncs.add(s.user_id)
                log.exception("syncing Redis for %s failed", s.user_id)
