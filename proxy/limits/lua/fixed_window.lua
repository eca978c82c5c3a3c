-- Fixed window anchored at the key's first admitted request.
-- Stored: hash {s = window start (us), n = count}. The key expires when its
-- window ends, a moment fixed when the window opens: only the request that
-- opens a window sets the TTL (one PEXPIRE per window, not per request). This
-- assumes a key's window never changes: its name carries the policy's
-- fingerprint (plans._fingerprint).
-- Built by the driver on first use in a call (check.lua: only the algorithms
-- a call names pay for their closures).
local function fixed_window_module()
  local fixed_window = {}

  local function fixed_window_read(key, now, window)
    local fields = redis.call('HMGET', key, 's', 'n')
    local start = tonumber(fields[1])
    if start == nil or now >= start + window then
      return now, 0
    end
    return start, tonumber(fields[2])
  end

  function fixed_window.check(key, now, cost, limit, window)
    local start, count = fixed_window_read(key, now, window)
    local token = ''
    if cost > 0 then token = fmt(start) end
    if cost > limit then
      local reset = 0
      if count > 0 then reset = start + window - now end
      return verdict(false, limit - count, reset, window, '')
    end
    if count + cost <= limit then
      local opens = count == 0  -- no live window: this request opens one
      count = count + cost
      local reset = 0
      if count > 0 then reset = start + window - now end
      local v = verdict(true, limit - count, reset, 0, token)
      v.start, v.count, v.ttl, v.opens = start, count, start + window - now, opens
      return v
    end
    return verdict(false, limit - count, start + window - now, start + window - now, '')
  end

  function fixed_window.commit(key, v)
    redis.call('HSET', key, 's', fmt(v.start), 'n', fmt(v.count))
    if v.opens then expire(key, v.ttl) end
  end

  function fixed_window.refund(key, now, cost, limit, window, burst, token)
    local fields = redis.call('HMGET', key, 's', 'n')
    local start = tonumber(fields[1])
    if start == nil or now >= start + window then
      redis.call('DEL', key)
      return
    end
    if token ~= '' and token ~= fmt(start) then return end
    local count = math.max(0, tonumber(fields[2]) - cost)
    if count > 0 then
      redis.call('HSET', key, 'n', fmt(count))
    else
      redis.call('DEL', key)
    end
  end
  return fixed_window
end
