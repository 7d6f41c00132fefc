-- Takes (or renews) a slot of a shared concurrency limit for a holder. ARGV: limit name,
-- holder, lease ms, configured maximum, wait ('1': a holder turned away joins the limit's
-- waiters, which a release wakes in order; '0': it does not). The live cap adapts (see
-- slot_throttle.lua) and recovers by one slot per recovery period without throttling.
-- Returns {1, in use, cap} when held, {0, in use, cap} when full.
local name, holder, lease, max, wait = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local zk = P .. ':limit:' .. name
local ck = P .. ':limit:' .. name .. ':cap'
local wk = P .. ':limit:' .. name .. ':waiters'
redis.call('ZREMRANGEBYSCORE', zk, '-inf', NOW)
local c = redis.call('HMGET', ck, 'cap', 'recover_at', 'period')
local cap = tonumber(c[1]) or max
if cap > max then cap = max end
if cap < max and c[2] and NOW >= tonumber(c[2]) then
  cap = cap + 1
  redis.call('HSET', ck, 'cap', cap, 'recover_at', NOW + tonumber(c[3] or 30000))
end
local in_use = redis.call('ZCARD', zk)
if redis.call('ZSCORE', zk, holder) then
  redis.call('ZADD', zk, NOW + lease, holder)
  return { 1, in_use, cap }
end
if in_use >= cap then
  if wait == '1' then redis.call('ZADD', wk, 'NX', NOW, holder) end
  return { 0, in_use, cap }
end
redis.call('ZADD', zk, NOW + lease, holder)
if wait == '1' then redis.call('ZREM', wk, holder) end
return { 1, in_use + 1, cap }
