-- GCRA: one value per key, the theoretical arrival time tat + frac / limit
-- (us; emission interval window / limit), stored as the string "tat:frac".
-- Burst: the number of requests an idle client may send at once (burst
-- argument, 0 meaning limit). Arithmetic is in units of us * limit: one
-- request costs window, the tolerance is burst * window.
-- Built by the driver on first use in a call (check.lua: only the algorithms
-- a call names pay for their closures).
local function gcra_module()
  local gcra = {}

  -- (TAT - now) * limit, at least 0.
  local function gcra_debt(key, now, limit)
    local value = redis.call('GET', key)
    if not value then return 0 end
    local tat, frac = string.match(value, '^([^:]+):(.+)$')
    return math.max(0, (tonumber(tat) - now) * limit + tonumber(frac))
  end

  local function gcra_store(key, now, limit, debt)
    local whole = math.floor(debt / limit)
    redis.call('SET', key, fmt(now + whole) .. ':' .. fmt(debt - whole * limit),
      'PX', ttl_ms(math.ceil(debt / limit)))
  end

  function gcra.check(key, now, cost, limit, window, burst)
    if burst == 0 then burst = limit end
    local debt = gcra_debt(key, now, limit)
    local tolerance = burst * window
    local after = debt + cost * window
    local allowed = cost <= burst and after <= tolerance
    local retry = 0
    if cost > burst then
      retry = window
    elseif not allowed then
      retry = math.ceil((after - tolerance) / limit)
    end
    local used = debt
    if allowed then used = after end
    local remaining = math.floor((tolerance - used) / window)
    local v = verdict(allowed, remaining, math.ceil(used / limit), retry, '')
    v.now, v.limit, v.debt = now, limit, after
    return v
  end

  function gcra.commit(key, v)
    gcra_store(key, v.now, v.limit, v.debt)
  end

  function gcra.refund(key, now, cost, limit, window)
    local debt = gcra_debt(key, now, limit) - cost * window
    if debt > 0 then
      gcra_store(key, now, limit, debt)
    else
      redis.call('DEL', key)
    end
  end
  return gcra
end
