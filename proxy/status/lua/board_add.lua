-- Add rejection counts to one minute bucket of the clients leaderboard.
-- KEYS[1]: the bucket (a sorted set: member "rule<TAB>client", score = rejections)
-- ARGV[1]: TTL in seconds; ARGV[2]: how many members the bucket keeps (the largest);
-- ARGV[3..]: member, count, member, count, ...
local bucket = KEYS[1]
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', bucket, ARGV[i + 1], ARGV[i])
end
redis.call('EXPIRE', bucket, ARGV[1])
local over = redis.call('ZCARD', bucket) - tonumber(ARGV[2])
if over > 0 then
  redis.call('ZREMRANGEBYRANK', bucket, 0, over - 1)
end
return over
