"""The Redis hold protocol: the key layout, the Lua scripts (`lua/*.lua`) and what their replies mean.

Both sides use this module and nothing else names a key or parses a reply: credits' Redis adapter
(`services/credits/holds.py`), which owns the account mirror, and the proxy's fast path (`fast_path.py`),
which places holds with the same `reserve.lua` and leaves what it could not deliver beside them.

Keys (`<ns>` is the namespace, REDIS_NAMESPACE, "credits" by default). Every key of one user carries the
hash tag `{<tag>}`, `tag` = `user_tag(user_id)`, so each script touches one slot and runs unchanged on
Redis Cluster whatever characters the id holds; the id itself follows the kind, where braces no longer count:

- `<ns>:{<tag>}:acct:<user_id>` — one hash per user: `b` balance (= PostgreSQL ledger sum at version `v`),
  `d` credits held, `v` account version, `e` load epoch (= accounts.redis_epoch), `h:<reservation_id>`
  held credits, `i:<idempotency_key>` reservation id, `k:<reservation_id>` its idempotency key. Its
  presence is the "loaded" marker: a missing hash is never read as zero; it means "rebuild from PostgreSQL".
- `<ns>:{<tag>}:deadlines:<user_id>` — the user's open holds scored by deadline (ms). A hold still there
  past deadline + grace missed its end (its process died before persisting it, or after a commit or
  release but before the sync here, leaving the balance stale too): a script that meets one drops
  the user's keys, and the account is rebuilt from PostgreSQL.
- `<ns>:{<tag>}:pending:<user_id>` — what a proxy owes credits, kept beside the holds (the proxy's `park`,
  credits' `PendingSettlements.drain_pending`), in the user's slot so that the script placing a hold writes its
  record there atomically. Fields: `h:<reservation_id>` the record of a hold placed by a proxy
  ("<amount> <deadline_ms> <epoch> <kind>", written by reserve.lua, removed by confirm.lua once credits
  has recorded it), `s:<reservation_id>` a settlement the proxy could not deliver (the JSON item of
  `POST /v1/reservations/batch`). `settlement_entry` writes the latter, `pending_entry` reads both.
- `<ns>:pending:{<n>}` — users with settlements waiting, in `PENDING_SHARDS` sorted sets (member = user id,
  score = a count bumped per parking), which credits' sweeper walks (`unlist.lua` takes a user off).
- `<ns>:deadlines:{<n>}` — sharded sorted sets (score = deadline, member = `<user_id><INDEX_SEPARATOR>
  <reservation_id>`) of persisted holds, written once per group commit; credits' sweeper walks every
  shard after the deadline to bring Redis back in line with PostgreSQL where a post-commit sync was lost
  (e.g. the process died after a PostgreSQL commit). Each shard is its own hash tag (slot), so on Redis
  Cluster the index is spread over the nodes and no single key takes every write; every command on it
  names one shard. Entries leave at their deadline (not at commit, which would cost a command per
  commit), so the index holds about reserve rate x TTL members.

Every script touches the keys of one user (one slot), or one shard of an index.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from shared.redis_client import AnyRedis

DEFAULT_NAMESPACE = "credits"
PENDING_SHARDS = 16
INDEX_SEPARATOR = "\x1f"  # user ids never contain control characters


# --- keys


def user_tag(user_id: str) -> str:
    """The hash tag of every key of one user: 16 hex digits of a digest of the id. Never the id itself:
    Redis Cluster hashes only what lies between the first `{` and the next `}`, so an id containing
    braces (`}`, `{`, `}{`) would cut the tag short and scatter the user's keys over several slots."""
    return hashlib.blake2b(user_id.encode(), digest_size=8).hexdigest()


def user_key(namespace: str, user_id: str, kind: str) -> str:
    """`<namespace>:{<user_tag>}:<kind>:<user_id>`: the tag picks the slot, the id (after it, where
    braces no longer matter) keeps the key unique and readable; `kind` is "acct", "deadlines", or
    another per-user structure that must share the user's slot."""
    return f"{namespace}:{{{user_tag(user_id)}}}:{kind}:{user_id}"


def user_keys(namespace: str, user_id: str) -> list[str]:
    """A user's account hash and deadline set (KEYS of every credits script), in one Cluster slot."""
    return [user_key(namespace, user_id, "acct"), user_key(namespace, user_id, "deadlines")]


def user_keys_with_pending(namespace: str, user_id: str) -> list[str]:
    """`user_keys` and then `pending_key`: the KEYS of reserve.lua and confirm.lua for a hold placed by
    a proxy (its record lives in the pending hash). One digest for the three."""
    tagged = f"{namespace}:{{{user_tag(user_id)}}}:"
    return [f"{tagged}acct:{user_id}", f"{tagged}deadlines:{user_id}", f"{tagged}pending:{user_id}"]


def pending_key(namespace: str, user_id: str) -> str:
    """The user's hash of records and settlements not yet in PostgreSQL (same hash tag as `user_keys`)."""
    return user_key(namespace, user_id, "pending")


def pending_index_key(namespace: str, shard: int) -> str:
    return f"{namespace}:pending:{{{shard}}}"


def pending_shard(user_id: str) -> int:
    return shard_of(user_id, PENDING_SHARDS)


def deadline_index_key(namespace: str, shard: int) -> str:
    return f"{namespace}:deadlines:{{{shard}}}"


def shard_of(user_id: str, shards: int) -> int:
    """The shard of an index (deadlines, pending) that lists the user."""
    return zlib.crc32(user_id.encode()) % shards


# --- scripts


class LuaScript:
    """One of the scripts in `lua/`, run with EVALSHA and loaded again after a NOSCRIPT (a restarted or
    flushed Redis).

    Leaner than redis-py's `Script` on the hot path: no type checks per call, and a pipeline of calls
    is one round trip (redis-py's pipelines send SCRIPT EXISTS before every pipeline that runs a
    registered script, a second round trip each time). Only idempotent scripts may be pipelined:
    after a NOSCRIPT the whole pipeline runs again, and a Redis whose scripts were flushed part-way
    through (or a Cluster node that lost them) could have run some calls already.

    On Redis Cluster (`shared.redis_client`) EVALSHA is routed by the slot of its keys (every call
    names one user's keys, one slot); a pipeline is split by node and sent to the nodes concurrently,
    and SCRIPT LOAD goes to every master, so a NOSCRIPT on any node is mended the same way.
    """

    def __init__(self, name: str, *, idempotent: bool = False) -> None:
        self.name = name
        self.idempotent = idempotent
        self.source = resources.files("shared.holds").joinpath("lua", name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: AnyRedis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        except NoScriptError:
            await client.script_load(self.source)  # type: ignore[no-untyped-call]
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]

    async def many(self, client: AnyRedis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Runs the script once per (keys, args), all in one pipelined round trip; answers in order."""
        if not self.idempotent:
            raise TypeError(f"{self.name} is not idempotent: it must not be pipelined with retries")
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self(client, keys, args)]
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            try:
                return await pipe.execute()  # type: ignore[no-any-return]
            except NoScriptError:
                if attempt:
                    raise
                await client.script_load(self.source)  # type: ignore[no-untyped-call]
        raise AssertionError("unreachable")


# The scripts, each read once per process. KEYS and ARGV of each are described at the top of its file.
RESERVE = LuaScript("reserve.lua")
CONFIRM = LuaScript("confirm.lua", idempotent=True)
APPLY = LuaScript("apply.lua", idempotent=True)
LOAD = LuaScript("load.lua")
VIEW = LuaScript("view.lua")
UNLIST = LuaScript("unlist.lua")


# --- replies


def as_text(value: Any) -> str:
    """A reply element as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


class ReserveStatus(IntEnum):
    """The first element of reserve.lua's reply."""

    NOT_LOADED = -1  # the account is not loaded (or was just dropped): rebuild it, then retry
    SHORT = 0  # too few credits available
    HELD = 1
    REPLAY = 2  # the idempotency key names a hold already placed


# Looked up once: on Python 3.11 `ReserveStatus(n)` costs about 1 µs and `ReserveStatus.REPLAY` 0.1 µs.
_RESERVE_STATUSES = {status.value: status for status in ReserveStatus}
_REPLAY = ReserveStatus.REPLAY


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    status: ReserveStatus
    available: int  # credits available afterwards (0 for a replay)
    epoch: str  # the account's load epoch
    held: int  # credits actually held (below the amount asked for only with "upto")
    existing_id: str | None = None  # a replay's reservation id


def reserve_outcome(reply: Any) -> ReserveOutcome:
    """reserve.lua's {status, value, epoch, held}."""
    status = _RESERVE_STATUSES[int(reply[0])]
    if status is _REPLAY:
        return ReserveOutcome(status, 0, as_text(reply[2]), 0, existing_id=as_text(reply[1]))
    return ReserveOutcome(
        status, int(reply[1]), as_text(reply[2]) if reply[2] is not None else "", int(reply[3])
    )


def confirm_stands(reply: Any) -> bool:
    """confirm.lua's {ok, available}: whether the recorded hold stands in Redis (or needs no place there)."""
    return int(reply[0]) == 1


def apply_available(reply: Any) -> int | None:
    """apply.lua's reply: credits available, or None when the account is not loaded."""
    available = int(reply)
    return None if available == -1 else available


def load_available(reply: Any) -> int:
    """load.lua's reply: credits available once loaded."""
    return int(reply)


@dataclass(frozen=True)
class Snapshot:
    balance: int
    held: int
    version: int  # the account version `balance` reflects

    @property
    def available(self) -> int:
        # Never below zero: only a charge counted twice (a lost commit sync overtaken by a later
        # sync, until the sweeper or the hold's deadline mends it) could take it there.
        return max(self.balance - self.held, 0)


def view_snapshot(reply: Any) -> Snapshot | None:
    """view.lua's {balance, held, version}, or None when the account is not loaded (or was dropped)."""
    if not reply:
        return None
    return Snapshot(int(reply[0]), int(reply[1]), int(reply[2]))


def unlisted(reply: Any) -> bool:
    """unlist.lua's reply: whether the user was taken off the list."""
    return int(reply) == 1


# --- the pending hash's entries


@dataclass(frozen=True, slots=True)
class PendingHold:
    """`h:<reservation_id>`: the record reserve.lua wrote of a hold a proxy placed."""

    reservation_id: str
    amount: int
    deadline_ms: int
    epoch: str
    kind: str


@dataclass(frozen=True, slots=True)
class PendingSettlement:
    """`s:<reservation_id>`: a batch item (commit or release) a proxy could not deliver."""

    reservation_id: str
    action: str
    amount: int | None
    details: str | None  # the usage details as JSON text, as the batch endpoint stores them
    overage: int


def settlement_entry(reservation_id: str, item: dict[str, Any]) -> tuple[str, bytes]:
    """The field and value under which a proxy parks one undelivered batch item."""
    return f"s:{reservation_id}", orjson.dumps(item)


def pending_entry(name: str, value: str) -> PendingHold | PendingSettlement:
    """One entry of the pending hash; ValueError when it is not one this protocol writes."""
    kind, _, rid = name.partition(":")
    try:
        if kind == "h":
            amount, deadline_ms, epoch, hold_kind = value.split(" ")
            return PendingHold(rid, int(amount), int(deadline_ms), epoch, hold_kind)
        if kind == "s":
            item = orjson.loads(value)
            amount_ = item.get("amount")
            about = item.get("details")
            return PendingSettlement(
                rid,
                str(item["action"]),
                None if amount_ is None else int(amount_),
                None if about is None else orjson.dumps(about).decode(),
                max(int(item.get("overage", 0)), 0),
            )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed pending entry {name}") from exc
    raise ValueError(f"unknown pending entry {name}")
