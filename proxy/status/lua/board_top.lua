-- The largest members summed over several minute buckets of the clients leaderboard.
-- KEYS[1]: a scratch key (same slot), deleted before returning; KEYS[2..]: the buckets.
-- ARGV[1]: how many members to return.
-- Returns member, score, member, score, ... largest first.
local scratch = KEYS[1]
redis.call('ZUNIONSTORE', scratch, #KEYS - 1, unpack(KEYS, 2))
local top = redis.call('ZREVRANGE', scratch, 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
redis.call('DEL', scratch)
return top
