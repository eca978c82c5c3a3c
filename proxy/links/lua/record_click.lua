-- Add one click to a link's per-day analytics; all keys share the {<code>} slot.
-- KEYS[1]: lk:{<code>}            the link hash (last_click is kept there)
-- KEYS[2]: lk:{<code>}:d:<day>    counters: n, u:<family>, v:<variant>, r:<host>
-- KEYS[3]: lk:{<code>}:v:<day>    HyperLogLog of visitors
-- KEYS[4]: lk:{<code>}:days       set of days with analytics (for delete)
-- ARGV[1]: day, ARGV[2]: Unix time (s), ARGV[3]: TTL (s) of the day keys,
-- ARGV[4]: visitor digest or '', ARGV[5..]: counter names besides n.
-- Returns 0 without writing when the link does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[2], 'n', 1)
for i = 5, #ARGV do
  redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
end
redis.call('EXPIRE', KEYS[2], ttl)
if ARGV[4] ~= '' then
  redis.call('PFADD', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ttl)
local last = tonumber(redis.call('HGET', KEYS[1], 'last_click') or '0')
if tonumber(ARGV[2]) > last then
  redis.call('HSET', KEYS[1], 'last_click', ARGV[2])
end
return 1
