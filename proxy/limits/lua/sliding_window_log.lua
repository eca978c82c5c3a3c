-- Sliding window log: one sorted-set entry per unit of cost, scored by its
-- time (us); an entry counts while score > now - window. Members are
-- "<now>:<seq>:<j>" (j = 1..cost); the token is "<now>:<seq>".
-- Built by the driver on first use in a call (check.lua: only the algorithms
-- a call names pay for their closures).
local function sliding_window_log_module()
  local sliding_window_log = {}

  local function sliding_window_log_members(token, cost)
    local members = {}
    for j = 1, cost do members[j] = token .. ':' .. j end
    return members
  end

  function sliding_window_log.check(key, now, cost, limit, window)
    local cutoff = now - window
    local alive = redis.call('ZCOUNT', key, '(' .. fmt(cutoff), '+inf')
    local newest = now
    if alive > 0 then
      newest = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
    end
    if cost > limit then
      local reset = 0
      if alive > 0 then reset = newest + window - now end
      return verdict(false, limit - alive, reset, window, '')
    end
    if alive + cost <= limit then
      local used = alive + cost
      local token = ''
      if cost > 0 then
        newest = math.max(newest, now)
        local seq = 1
        while redis.call('ZSCORE', key, fmt(now) .. ':' .. seq .. ':1') do
          seq = seq + 1
        end
        token = fmt(now) .. ':' .. seq
      end
      local reset = 0
      if used > 0 then reset = newest + window - now end
      local v = verdict(true, limit - used, reset, 0, token)
      v.now, v.cutoff, v.cost, v.ttl = now, cutoff, cost, newest + window - now
      return v
    end
    local needed = redis.call('ZRANGEBYSCORE', key, '(' .. fmt(cutoff), '+inf',
      'WITHSCORES', 'LIMIT', alive + cost - limit - 1, 1)
    local retry = tonumber(needed[2]) + window - now
    return verdict(false, limit - alive, newest + window - now, retry, '')
  end

  function sliding_window_log.commit(key, v)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(v.cutoff))
    local members = sliding_window_log_members(v.token, v.cost)
    local score = fmt(v.now)
    for first = 1, #members, 100 do
      local args = {}
      for j = first, math.min(first + 99, #members) do
        args[#args + 1] = score
        args[#args + 1] = members[j]
      end
      redis.call('ZADD', key, unpack(args))
    end
    expire(key, v.ttl)
  end

  function sliding_window_log.refund(key, now, cost, limit, window, burst, token)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
    if token ~= '' then
      local members = sliding_window_log_members(token, cost)
      for first = 1, #members, 100 do
        redis.call('ZREM', key, unpack(members, first, math.min(first + 99, #members)))
      end
    end
  end
  return sliding_window_log
end
