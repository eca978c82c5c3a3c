-- Delete KEYS[1] only if it still holds ARGV[1] (release our lock, or drop a
-- dedupe entry that still points at the deleted code).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
