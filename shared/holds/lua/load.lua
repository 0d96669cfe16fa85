-- Replace a user's Redis state with a PostgreSQL snapshot. The caller holds the account row lock
-- (SELECT ... FOR UPDATE) while this runs, so the snapshot is the current truth.
-- KEYS[1]  credits:{<tag>}:acct:<user_id>, KEYS[2] credits:{<tag>}:deadlines:<user_id> (as in reserve.lua)
-- ARGV[1]  balance (credits), ARGV[2] account version, ARGV[3] epoch (accounts.redis_epoch, bumped per rebuild)
-- ARGV[4..] quadruples of open holds: reservation id, held credits, idempotency key ("" for none),
--          deadline (ms since epoch)
-- Returns available credits.
local acct, deadlines = KEYS[1], KEYS[2]
redis.call('DEL', acct, deadlines)
local held = 0
for i = 4, #ARGV, 4 do
  local amount = tonumber(ARGV[i + 1])
  held = held + amount
  redis.call('HSET', acct, 'h:' .. ARGV[i], ARGV[i + 1])
  redis.call('ZADD', deadlines, ARGV[i + 3], ARGV[i])
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', acct, 'i:' .. ARGV[i + 2], ARGV[i], 'k:' .. ARGV[i], ARGV[i + 2])
  end
end
redis.call('HSET', acct, 'b', ARGV[1], 'd', held, 'v', ARGV[2], 'e', ARGV[3])
return tonumber(ARGV[1]) - held
