-- wrk script for the "paced" load: each connection waits a random 5-15 ms
-- (10 ms on average) before each request, so C connections offer about
-- C / (10 ms + latency) requests per second: a moderate, roughly fixed rate
-- for every target that keeps up. wrk starts its latency clock when the
-- request is written, so the wait is not counted as latency.
-- (Closed loop, not wrk2's open loop: a stalled response delays the next.)
function delay()
   return math.random(5, 15)
end
