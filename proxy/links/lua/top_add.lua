-- One click into the leaderboard's hour bucket. KEYS[1]: lk:top:{top}:<hour>.
-- ARGV[1]: code, ARGV[2]: TTL (s) of the bucket.
redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
