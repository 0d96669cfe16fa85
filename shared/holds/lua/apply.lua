-- Bring a loaded account in line with a committed PostgreSQL change (run after the commit).
-- KEYS[1]  credits:{<tag>}:acct:<user_id>, KEYS[2] credits:{<tag>}:deadlines:<user_id> (as in reserve.lua)
-- ARGV[1]  balance (credits) read from PostgreSQL together with ARGV[2], or "" to leave the balance alone
-- ARGV[2]  account version of that balance, or ""
-- ARGV[3..] reservation ids of holds that have ended (in PostgreSQL, or never got there)
-- Holds leave by membership (a hold already gone is not subtracted twice) and the balance only moves
-- forward in version, so applying the same change twice, late, or out of order is harmless.
-- Returns available credits, or -1 when the account is not loaded (the next rebuild reads PostgreSQL).
local acct, deadlines = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then
  return -1
end
for i = 3, #ARGV do
  local rid = ARGV[i]
  local held = redis.call('HGET', acct, 'h:' .. rid)
  if held then
    redis.call('HDEL', acct, 'h:' .. rid)
    redis.call('HINCRBY', acct, 'd', -tonumber(held))
  end
  local key = redis.call('HGET', acct, 'k:' .. rid)
  if key then
    redis.call('HDEL', acct, 'k:' .. rid)
    if redis.call('HGET', acct, 'i:' .. key) == rid then
      redis.call('HDEL', acct, 'i:' .. key)
    end
  end
  redis.call('ZREM', deadlines, rid)
end
if ARGV[2] ~= '' then
  local version = tonumber(redis.call('HGET', acct, 'v'))
  if tonumber(ARGV[2]) > version then
    redis.call('HSET', acct, 'b', ARGV[1], 'v', ARGV[2])
  end
end
local vals = redis.call('HMGET', acct, 'b', 'd')
local available = tonumber(vals[1]) - tonumber(vals[2])
if available < 0 then
  available = 0  -- a hold still counted after its commit's sync was lost (see reserve.lua)
end
return available
