-- Overwrite some fields of an existing link. KEYS[1]: lk:{<code>}.
-- ARGV: field, value, ... Returns 1 when patched, 0 when the link is gone
-- (so a patch racing a delete never resurrects a partial hash).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
