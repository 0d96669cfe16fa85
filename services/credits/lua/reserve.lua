-- Place a hold on a user's available credits (available = balance - held).
-- KEYS[1]  credits:{<user_id>}:acct  hash: b = balance (credits, = the PostgreSQL ledger sum at version v),
--          d = credits held by open holds, v = account version, e = load epoch,
--          h:<reservation_id> = held credits, i:<idempotency_key> = reservation_id,
--          k:<reservation_id> = that reservation's idempotency key
-- KEYS[2]  credits:{<user_id>}:deadlines  sorted set: reservation_id scored by its deadline (ms since epoch)
-- ARGV[1]  reservation id
-- ARGV[2]  credits to hold (integer > 0)
-- ARGV[3]  idempotency key, or "" for none
-- ARGV[4]  "exact" (all or nothing) or "upto" (hold min(credits, available); used by refund claw-backs)
-- ARGV[5]  deadline of the new hold (ms since epoch)
-- ARGV[6]  now minus the grace period (ms since epoch): holds whose deadline is before it are dead
--          (a commit after the deadline is refused) and leave Redis here, whether or not they ever
--          reached PostgreSQL; the sweeper records their expiry in PostgreSQL.
-- Returns {status, value, epoch, held}:
--   status  1 = held; value = credits available afterwards; held = credits actually held
--           0 = insufficient credits; value = credits available
--           2 = idempotent replay; value = the existing reservation id
--          -1 = the account is not loaded: rebuild it from PostgreSQL, then retry
local acct, deadlines = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then
  return {-1, 0, '', 0}
end
local dead = redis.call('ZRANGEBYSCORE', deadlines, '-inf', '(' .. ARGV[6], 'LIMIT', 0, 32)
for _, rid in ipairs(dead) do
  local held = redis.call('HGET', acct, 'h:' .. rid)
  if held then
    redis.call('HDEL', acct, 'h:' .. rid)
    redis.call('HINCRBY', acct, 'd', -tonumber(held))
  end
  local k = redis.call('HGET', acct, 'k:' .. rid)
  if k then
    redis.call('HDEL', acct, 'k:' .. rid)
    if redis.call('HGET', acct, 'i:' .. k) == rid then
      redis.call('HDEL', acct, 'i:' .. k)
    end
  end
  redis.call('ZREM', deadlines, rid)
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
return {1, available - amount, vals[3], amount}
