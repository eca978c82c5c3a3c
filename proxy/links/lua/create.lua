-- Create a link if its code is free. KEYS[1]: lk:{<code>} (the link hash).
-- ARGV: field, value, field, value, ... (every field of the new hash).
-- Returns 1 when created, 0 when the code is taken (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
