-- Read a user's balance and held credits, first dropping holds that are past their deadline.
-- KEYS[1]  credits:{<user_id>}:acct, KEYS[2] credits:{<user_id>}:deadlines (as in reserve.lua)
-- ARGV[1]  now minus the grace period (ms since epoch), as ARGV[6] of reserve.lua
-- Returns {balance, held} in credits, or {} when the account is not loaded.
local acct, deadlines = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then
  return {}
end
local dead = redis.call('ZRANGEBYSCORE', deadlines, '-inf', '(' .. ARGV[1], 'LIMIT', 0, 256)
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
local vals = redis.call('HMGET', acct, 'b', 'd')
return {tonumber(vals[1]), tonumber(vals[2])}
