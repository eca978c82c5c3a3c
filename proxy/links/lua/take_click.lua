-- Count one click unless the cap is reached, atomically. KEYS[1]: lk:{<code>}.
-- ARGV[1]: max_clicks, or '' for no cap.
-- Returns 1 (counted), 0 (over the cap) or -1 (no such link).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if ARGV[1] ~= '' then
  local clicks = tonumber(redis.call('HGET', KEYS[1], 'clicks') or '0')
  if clicks >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('HINCRBY', KEYS[1], 'clicks', 1)
return 1
