-- Place a hold on a user's available credits (available = balance - held).
-- <tag> is a digest of the user id (shared/holds/protocol.py `user_tag`): every key of a user in one slot.
-- KEYS[1]  credits:{<tag>}:acct:<user_id>  hash: b = balance (credits, = the PostgreSQL ledger sum at version v),
--          d = credits held by open holds, v = account version, e = load epoch,
--          h:<reservation_id> = held credits, i:<idempotency_key> = reservation_id,
--          k:<reservation_id> = that reservation's idempotency key
-- KEYS[2]  credits:{<tag>}:deadlines:<user_id>  sorted set: reservation_id scored by its deadline (ms since epoch)
-- KEYS[3]  optional, for a hold placed by a proxy: credits:{<tag>}:pending:<user_id>, the hash of what is not yet
--          in PostgreSQL; the hold's record goes there as h:<reservation_id> = "<held> <deadline> <epoch>
--          <kind>" (removed by confirm.lua when credits records it, or applied by credits from there)
-- ARGV[1]  reservation id
-- ARGV[2]  credits to hold (integer > 0)
-- ARGV[3]  idempotency key, or "" for none
-- ARGV[4]  "exact" (all or nothing) or "upto" (hold min(credits, available); used by refund claw-backs)
-- ARGV[5]  deadline of the new hold (ms since epoch)
-- ARGV[6]  now minus the grace period (ms since epoch): a hold whose deadline is before it is dead (a
--          commit after the deadline is refused) and should have left Redis already (see below). The
--          proxy passes 0 (no hold is dead): only the credits service judges, by its clock and grace.
-- ARGV[7]  with KEYS[3]: the kind of the hold ("usage")
-- Returns {status, value, epoch, held}:
--   status  1 = held; value = credits available afterwards; held = credits actually held
--           0 = insufficient credits; value = credits available
--           2 = idempotent replay; value = the existing reservation id
--          -1 = the account is not loaded (or was just dropped): rebuild it from PostgreSQL, then retry
local acct, deadlines = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then
  return {-1, 0, '', 0}
end
-- A hold still here past its deadline plus the grace period missed its end: its process died before
-- persisting it, or after a commit or release in PostgreSQL but before syncing it here (and then the
-- balance here is stale too). Only PostgreSQL knows which, so the account is dropped and rebuilt
-- from it (-1) rather than the hold simply dropped, which would hand a committed charge back.
if redis.call('ZRANGEBYSCORE', deadlines, '-inf', '(' .. ARGV[6], 'LIMIT', 0, 1)[1] then
  redis.call('DEL', acct, deadlines)
  return {-1, 0, '', 0}
end
local key = ARGV[3]
local vals = redis.call('HMGET', acct, 'b', 'd', 'e')
if key ~= '' then
  local existing = redis.call('HGET', acct, 'i:' .. key)
  if existing then
    return {2, existing, vals[3], 0}
  end
end
local available = tonumber(vals[1]) - tonumber(vals[2])
if available < 0 then
  -- Only a count gone wrong on the safe side gets here: a commit whose sync was lost while a later
  -- sync brought the balance forward, so the charge is in the balance and its hold still counted.
  available = 0
end
local amount = tonumber(ARGV[2])
if ARGV[4] == 'upto' then
  if available < amount then
    amount = available
  end
  if amount <= 0 then
    return {1, available, vals[3], 0}
  end
elseif amount > available then
  return {0, available, vals[3], 0}
end
redis.call('HINCRBY', acct, 'd', amount)
redis.call('HSET', acct, 'h:' .. ARGV[1], amount)
if key ~= '' then
  redis.call('HSET', acct, 'i:' .. key, ARGV[1], 'k:' .. ARGV[1], key)
end
redis.call('ZADD', deadlines, ARGV[5], ARGV[1])
if KEYS[3] then
  redis.call('HSET', KEYS[3], 'h:' .. ARGV[1], amount .. ' ' .. ARGV[5] .. ' ' .. vals[3] .. ' ' .. ARGV[7])
end
return {1, available - amount, vals[3], amount}
