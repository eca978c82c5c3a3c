-- Sliding window counter (Cloudflare's estimate): counts in clock-aligned
-- windows; estimate = previous * (window - elapsed) / window + current, kept
-- scaled by window so it stays integer. Stored: hash {k = window index,
-- c = current count, p = previous count}. The key expires two windows after
-- its index's window opens, a moment fixed by the index: the TTL is set when
-- the stored index changes, not on every request (a key's window never
-- changes: its name carries the policy's fingerprint, plans._fingerprint).
-- Built by the driver on first use in a call (check.lua: only the algorithms
-- a call names pay for their closures).
local function sliding_window_counter_module()
  local sliding_window_counter = {}

  -- (window index, current, previous, whether the key holds that index) at now.
  local function sliding_window_counter_roll(key, now, window)
    local index = math.floor(now / window)
    local fields = redis.call('HMGET', key, 'k', 'c', 'p')
    local stored = tonumber(fields[1])
    if stored == nil then return index, 0, 0, false end
    if index <= stored then  -- same window, or the clock stepped back
      return stored, tonumber(fields[2]), tonumber(fields[3]), true
    end
    if index == stored + 1 then return index, 0, tonumber(fields[2]), false end
    return index, 0, 0, false
  end

  local function sliding_window_counter_reset(index, current, previous, window, now)
    if current > 0 then return (index + 2) * window - now end
    if previous > 0 then return (index + 1) * window - now end
    return 0
  end

  function sliding_window_counter.check(key, now, cost, limit, window)
    local index, current, previous, kept = sliding_window_counter_roll(key, now, window)
    local start = index * window
    local elapsed = math.max(0, now - start)
    local used = previous * (window - elapsed) + current * window
    local capacity = limit * window
    local allowed = cost <= limit and used + cost * window <= capacity
    local retry = 0
    if allowed then
      current = current + cost
      used = used + cost * window
    elseif cost > limit then
      retry = window
    elseif limit - current - cost >= 0 then
      retry = start + (window - math.floor((limit - current - cost) * window / previous)) - now
    else
      retry = start + window + (window - math.floor((limit - cost) * window / current)) - now
    end
    local remaining = math.floor((capacity - used) / window)
    local reset = sliding_window_counter_reset(index, current, previous, window, now)
    local token = ''
    if allowed and cost > 0 then token = fmt(index) end
    local v = verdict(allowed, remaining, reset, retry, token)
    v.index, v.current, v.previous, v.ttl = index, current, previous, (index + 2) * window - now
    v.opens = not kept
    return v
  end

  function sliding_window_counter.commit(key, v)
    redis.call('HSET', key, 'k', fmt(v.index), 'c', fmt(v.current), 'p', fmt(v.previous))
    if v.opens then expire(key, v.ttl) end
  end

  function sliding_window_counter.refund(key, now, cost, limit, window, burst, token)
    local index, current, previous, kept = sliding_window_counter_roll(key, now, window)
    if token == '' or token == fmt(index) then
      current = math.max(0, current - cost)
    elseif token == fmt(index - 1) then
      previous = math.max(0, previous - cost)
    end
    if current == 0 and previous == 0 then
      redis.call('DEL', key)
      return
    end
    sliding_window_counter.commit(key, {
      index = index, current = current, previous = previous, ttl = (index + 2) * window - now,
      opens = not kept,
    })
  end
  return sliding_window_counter
end
