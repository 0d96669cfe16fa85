-- Replace a user's Redis state with a PostgreSQL snapshot. The caller holds the account row lock
-- (SELECT ... FOR UPDATE) while this runs, so the snapshot is the current truth.
-- KEYS[1]  credits:{<user_id>}:acct (fields as in reserve.lua)
-- ARGV[1]  balance (credits), ARGV[2] account version, ARGV[3] new epoch (random token)
-- ARGV[4..] triples of open holds: reservation id, held credits, idempotency key ("" for none)
-- Returns available credits.
local acct = KEYS[1]
redis.call('DEL', acct)
local held = 0
for i = 4, #ARGV, 3 do
  local amount = tonumber(ARGV[i + 1])
  held = held + amount
  redis.call('HSET', acct, 'h:' .. ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', acct, 'i:' .. ARGV[i + 2], ARGV[i], 'k:' .. ARGV[i], ARGV[i + 2])
  end
end
redis.call('HSET', acct, 'b', ARGV[1], 'd', held, 'v', ARGV[2], 'e', ARGV[3])
return tonumber(ARGV[1]) - held
