-- Token bucket: capacity limit, refilled continuously at limit per window.
-- The level is kept in token-microseconds (tokens * window) so refill and
-- cost are integer. Stored: hash {v = level, t = time of the level (us)}.
-- Built by the driver on first use in a call (check.lua: only the algorithms
-- a call names pay for their closures).
local function token_bucket_module()
  local token_bucket = {}

  -- (level, effective now) at now; a clock step back refills nothing.
  local function token_bucket_refill(key, now, limit, window)
    local fields = redis.call('HMGET', key, 'v', 't')
    local level, updated = tonumber(fields[1]), tonumber(fields[2])
    if level == nil then return limit * window, now end
    local at = math.max(now, updated)
    return math.min(limit * window, level + (at - updated) * limit), at
  end

  function token_bucket.check(key, now, cost, limit, window)
    local level, at = token_bucket_refill(key, now, limit, window)
    local need = cost * window
    local allowed = cost <= limit and level >= need
    if allowed then level = level - need end
    local retry = 0
    if cost > limit then
      retry = window
    elseif not allowed then
      retry = at + math.ceil((need - level) / limit) - now
    end
    local reset = at + math.ceil((limit * window - level) / limit) - now
    local v = verdict(allowed, math.floor(level / window), reset, retry, '')
    v.level, v.at, v.ttl = level, at, reset
    return v
  end

  function token_bucket.commit(key, v)
    redis.call('HSET', key, 'v', fmt(v.level), 't', fmt(v.at))
    expire(key, v.ttl)
  end

  function token_bucket.refund(key, now, cost, limit, window)
    local level, at = token_bucket_refill(key, now, limit, window)
    level = math.min(limit * window, level + cost * window)
    if level >= limit * window then
      redis.call('DEL', key)
      return
    end
    local ttl = at + math.ceil((limit * window - level) / limit) - now
    token_bucket.commit(key, {level = level, at = at, ttl = ttl})
  end
  return token_bucket
end
