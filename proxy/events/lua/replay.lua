-- Put dead letters back on the stream as fresh entries (same event, same id).
-- KEYS[1] stream, KEYS[2] state, KEYS[3] dead, KEYS[4] deadidx
-- ARGV[1] group, ARGV[2..] event ids
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
local moved = 0
for i = 2, #ARGV do
  local record = redis.call('HGET', KEYS[3], ARGV[i])
  if record then
    local cut = string.find(record, '\n', 1, true)
    redis.call('XADD', KEYS[1], '*', 'e', string.sub(record, cut + 1))
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[4], ARGV[i])
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[2], 'depth', moved)
end
return moved
