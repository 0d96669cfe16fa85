-- After a hold is persisted: if the account was rebuilt since the hold was placed (the epoch changed),
-- the rebuild may have missed it; put it back if the credits are still available.
-- KEYS[1]  credits:{<tag>}:acct:<user_id>, KEYS[2] credits:{<tag>}:deadlines:<user_id> (as in reserve.lua)
-- ARGV[1]  reservation id, ARGV[2] held credits, ARGV[3] idempotency key or "", ARGV[4] epoch seen by
--          reserve, ARGV[5] deadline (ms since epoch), ARGV[6] "strict" for a hold placed outside the
--          credits service (the proxy's fast path): under an unchanged epoch it must still be in Redis
--          (the sweeper may have ended it past its deadline, or it was never placed), so the epoch alone
--          is no proof
-- KEYS[3]  optional (with "strict"): credits:{<tag>}:pending:<user_id>; the hold's record there is removed, as
--          the hold is now in PostgreSQL
-- Returns {1, available} when the hold stands (or the account is not loaded: the next rebuild reads
-- the persisted hold), {0, available} when it could not be restored (the caller fails the reserve).
local acct, deadlines = KEYS[1], KEYS[2]
if KEYS[3] then
  redis.call('HDEL', KEYS[3], 'h:' .. ARGV[1])
end
if redis.call('EXISTS', acct) == 0 then
  return {1, -1}
end
local vals = redis.call('HMGET', acct, 'b', 'd', 'e')
local available = tonumber(vals[1]) - tonumber(vals[2])
if redis.call('HEXISTS', acct, 'h:' .. ARGV[1]) == 1 then
  return {1, available}
end
if vals[3] == ARGV[4] then
  if ARGV[6] == 'strict' then
    return {0, available}
  end
  return {1, available}
end
local amount = tonumber(ARGV[2])
if amount > available then
  return {0, available}
end
redis.call('HINCRBY', acct, 'd', amount)
redis.call('HSET', acct, 'h:' .. ARGV[1], amount)
if ARGV[3] ~= '' then
  redis.call('HSET', acct, 'i:' .. ARGV[3], ARGV[1], 'k:' .. ARGV[1], ARGV[3])
end
redis.call('ZADD', deadlines, ARGV[5], ARGV[1])
return {1, available - amount}
