-- Sluice rate-limit script. scripts.py concatenates: common.lua, the five
-- algorithm files, check.lua (the driver). Redis runs the whole body on every
-- call, so each algorithm file only defines <name>_module(), which the driver
-- calls for the algorithms a call names (defining all five every call cost
-- ~6 us of Redis CPU). A module returns the algorithm's table, with
--   check(key, now, cost, limit, window, burst) -> verdict (reads only)
--   commit(key, verdict)                        -> writes the admitted state
--   refund(key, now, cost, limit, window, burst, token) -> undoes one consume
-- and mirrors proxy/limits/algorithms.py operation for operation. Times are
-- whole microseconds held in doubles, exact below 2^53.

-- A number as text that reads back as the same double (tostring keeps 14 digits).
local function fmt(x)
  return string.format('%.17g', x)
end

local function verdict(allowed, remaining, reset, retry, token)
  return {allowed = allowed, remaining = remaining, reset = reset, retry = retry, token = token}
end

-- Every written key expires once its state has become equivalent to no state:
-- ttl_us from now, in whole ms rounded up (at least 1).
local function ttl_ms(ttl_us)
  return math.max(1, math.ceil(ttl_us / 1000))
end

local function expire(key, ttl_us)
  redis.call('PEXPIRE', key, ttl_ms(ttl_us))
end
