-- Take a user off a list of users with pending settlements, unless a proxy listed them again meanwhile.
-- KEYS[1]  credits:pending:{<shard>}  sorted set: user id scored by a count a proxy bumps per parking
-- ARGV[1]  user id, ARGV[2] the score read before the user's pending settlements were applied
-- Returns 1 when removed, 0 when the score moved (new settlements: the next pass applies them).
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
