-- Driver. KEYS[i]: the key of check i (distinct). ARGV[1]: now in ms, or ''
-- for Redis TIME. ARGV[2]: 'check' or 'refund'. Then per check: algorithm
-- code (1..5), cost, limit, window_ms, burst, and in refund mode the token.
-- Check mode is all-or-nothing: every check is evaluated before anything is
-- written, and only if every enforced check allows are the allowing checks'
-- states written. A negative algorithm code marks a shadow check: decided and
-- reported, never a veto; when it denies it writes nothing. Refund mode undoes
-- each check's consume and reports its standing as a cost-0 check.
-- Reply, per check: allowed (0/1), remaining, reset and retry-after in whole
-- microseconds (integer replies: every time here is a whole number of
-- microseconds below 2^53, so Redis's conversion to an integer is exact and
-- cheaper to send and parse than text), token ('' unless the call consumed).
local MODULES = {
  fixed_window_module, sliding_window_log_module, sliding_window_counter_module,
  token_bucket_module, gcra_module,
}
local ALGORITHMS = {}  -- code -> algorithm table, built on first use in this call

local now
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
else
  now = math.floor(tonumber(ARGV[1]) * 1000 + 0.5)
end
local refunding = ARGV[2] == 'refund'
if not refunding and ARGV[2] ~= 'check' then
  return redis.error_reply('ERR sluice: mode must be check or refund')
end
local width = 5
if refunding then width = 6 end
if #ARGV ~= 2 + width * #KEYS then
  return redis.error_reply('ERR sluice: expected ' .. width .. ' arguments per key')
end

local n = #KEYS
local algos, checks, admitted = {}, {}, true
local seen = nil  -- duplicate-key guard, needed only with several keys
if n > 1 then seen = {} end
for i = 1, n do
  local key = KEYS[i]
  if seen then
    if seen[key] then return redis.error_reply('ERR sluice: duplicate key ' .. key) end
    seen[key] = true
  end
  local at = 2 + (i - 1) * width
  local code = tonumber(ARGV[at + 1])
  local shadow = code ~= nil and code < 0
  if shadow then code = -code end
  local algorithm = ALGORITHMS[code]
  if algorithm == nil then
    local module = MODULES[code]
    if module == nil then return redis.error_reply('ERR sluice: bad algorithm code') end
    algorithm = module()
    ALGORITHMS[code] = algorithm
  end
  local cost, limit = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local window = math.floor(tonumber(ARGV[at + 4]) * 1000 + 0.5)
  local burst = tonumber(ARGV[at + 5])
  if refunding then
    algorithm.refund(key, now, cost, limit, window, burst, ARGV[at + 6])
    cost = 0
  end
  local v = algorithm.check(key, now, cost, limit, window, burst)
  algos[i], checks[i] = algorithm, v
  admitted = admitted and (v.allowed or shadow)
end

if admitted and not refunding then
  for i = 1, n do
    if checks[i].allowed then algos[i].commit(KEYS[i], checks[i]) end
  end
elseif not refunding then
  -- Denied: nothing was consumed, so a check that would have allowed reports its
  -- standing as it is (a cost-0 check), not as if this request had been charged.
  for i = 1, n do
    if checks[i].allowed then
      local at = 2 + (i - 1) * width
      checks[i] = algos[i].check(KEYS[i], now, 0, tonumber(ARGV[at + 3]),
        math.floor(tonumber(ARGV[at + 4]) * 1000 + 0.5), tonumber(ARGV[at + 5]))
    end
  end
end

local reply, keep = {}, admitted and not refunding
for i = 1, n do
  local v, at = checks[i], (i - 1) * 5
  local allowed, token = 0, ''
  if v.allowed then
    allowed = 1
    if keep then token = v.token end
  end
  reply[at + 1] = allowed
  reply[at + 2] = math.max(0, v.remaining)
  reply[at + 3] = v.reset
  reply[at + 4] = v.retry
  reply[at + 5] = token
end
return reply
