-- The leaderboard over some hour buckets, each weighted (the oldest one partly).
-- KEYS[1]: a scratch key, KEYS[2..]: lk:top:{top}:<hour> buckets (one slot).
-- ARGV[1]: how many entries, ARGV[2..]: the weight of each bucket.
-- Returns code, score, code, score, ... highest score first.
local args = {KEYS[1], #KEYS - 1}
for i = 2, #KEYS do
  args[#args + 1] = KEYS[i]
end
args[#args + 1] = 'WEIGHTS'
for i = 2, #ARGV do
  args[#args + 1] = ARGV[i]
end
redis.call('ZUNIONSTORE', unpack(args))
local top = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
redis.call('DEL', KEYS[1])
return top
