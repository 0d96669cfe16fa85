-- Read a user's balance, held credits and the account version the balance reflects.
-- KEYS[1]  credits:{<tag>}:acct:<user_id>, KEYS[2] credits:{<tag>}:deadlines:<user_id> (as in reserve.lua)
-- ARGV[1]  now minus the grace period (ms since epoch), as ARGV[6] of reserve.lua
-- Returns {balance, held, version}, or {} when the account is not loaded or holds a hold past its
-- deadline plus the grace period (then it is dropped, to be rebuilt from PostgreSQL).
local acct, deadlines = KEYS[1], KEYS[2]
if redis.call('EXISTS', acct) == 0 then
  return {}
end
if redis.call('ZRANGEBYSCORE', deadlines, '-inf', '(' .. ARGV[1], 'LIMIT', 0, 1)[1] then
  redis.call('DEL', acct, deadlines)  -- a hold missed its end: rebuild from PostgreSQL (see reserve.lua)
  return {}
end
local vals = redis.call('HMGET', acct, 'b', 'd', 'v')
return {tonumber(vals[1]), tonumber(vals[2]), tonumber(vals[3])}
