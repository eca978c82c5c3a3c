-- Append events to one subscription's stream, creating the stream and its
-- consumer group (from id 0, so nothing appended before is skipped) first.
-- KEYS[1] stream, KEYS[2] state
-- ARGV[1] group, ARGV[2..] event JSON
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
redis.call('HINCRBY', KEYS[2], 'depth', #ARGV - 1)
return #ARGV - 1
