-- Dead-letter the events of a delivery; record the failure.
-- A dead letter is "<info JSON>\n<event JSON>" in the dead hash, indexed by
-- event id (lexically, score 0) in the deadidx sorted set for paging.
-- KEYS[1] stream, KEYS[2] retry, KEYS[3] due, KEYS[4] born, KEYS[5] state,
-- KEYS[6] dead, KEYS[7] deadidx
-- ARGV[1] group, ARGV[2] now, ARGV[3] from unit ('' for stream entries),
-- ARGV[4] events in the unit, ARGV[5] reason, ARGV[6] n stream ids,
-- ARGV[7 .. 6+n] stream ids, then pairs: event id, record
local n = tonumber(ARGV[6])
local done = 0
if ARGV[3] == '' then
  if n > 0 then
    done = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 7, 6 + n))
  end
  if done == 0 then
    return 0
  end
elseif redis.call('HDEL', KEYS[2], ARGV[3]) == 1 then
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
  done = tonumber(ARGV[4])
else
  return 0
end
for i = 7 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[7], 0, ARGV[i])
end
redis.call('HINCRBY', KEYS[5], 'depth', -done)
redis.call('HSET', KEYS[5], 'last_error', ARGV[5], 'last_error_at', ARGV[2])
redis.call('HINCRBY', KEYS[5], 'failures', 1)
return done
