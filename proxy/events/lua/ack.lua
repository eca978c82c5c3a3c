-- Delivered: acknowledge stream entries, or delete a retry unit; record success.
-- KEYS[1] stream, KEYS[2] retry, KEYS[3] due, KEYS[4] born, KEYS[5] state
-- ARGV[1] group, ARGV[2] now, ARGV[3] unit ('' for stream entries),
-- ARGV[4] events in the unit, ARGV[5..] stream ids
local done = 0
if ARGV[3] == '' then
  done = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 5))
elseif redis.call('HDEL', KEYS[2], ARGV[3]) == 1 then
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
  done = tonumber(ARGV[4])
end
if done > 0 then
  redis.call('HINCRBY', KEYS[5], 'depth', -done)
end
redis.call('HSET', KEYS[5], 'last_success', ARGV[2], 'failures', 0)
return done
