-- A failed delivery: its events become (or stay) one retry unit, due at ARGV[5].
-- Stream entries are acknowledged in the same step, so they are never both
-- pending in the group and waiting in the unit.
-- KEYS[1] stream, KEYS[2] retry, KEYS[3] due, KEYS[4] born, KEYS[5] state
-- ARGV[1] group, ARGV[2] now, ARGV[3] from unit ('' for stream entries),
-- ARGV[4] unit, ARGV[5] due at, ARGV[6] oldest event time, ARGV[7] payload,
-- ARGV[8] error, ARGV[9..] stream ids
if ARGV[3] == '' then
  local ids = #ARGV - 8
  local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 9))
  if acked == 0 then
    return 0 -- settled meanwhile by whoever took over an expired lease
  end
  if acked < ids then
    -- some were acknowledged by another consumer: they are pending again here
    redis.call('HINCRBY', KEYS[5], 'depth', ids - acked)
  end
elseif redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return 0
elseif ARGV[3] ~= ARGV[4] then
  redis.call('HDEL', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
redis.call('HSET', KEYS[5], 'last_error', ARGV[8], 'last_error_at', ARGV[2])
redis.call('HINCRBY', KEYS[5], 'failures', 1)
return 1
