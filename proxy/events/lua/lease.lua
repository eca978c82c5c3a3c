-- Lease the retry unit due soonest: push its due time to the lease's end, so
-- it comes back by itself if the leaseholder dies.
-- KEYS[1] due, KEYS[2] retry, KEYS[3] born
-- ARGV[1] now, ARGV[2] lease end
-- Returns {unit, payload} or false.
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
while #found > 0 do
  local unit = found[1]
  local payload = redis.call('HGET', KEYS[2], unit)
  if payload then
    redis.call('ZADD', KEYS[1], ARGV[2], unit)
    return {unit, payload}
  end
  redis.call('ZREM', KEYS[1], unit)
  redis.call('ZREM', KEYS[3], unit)
  found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
end
return false
