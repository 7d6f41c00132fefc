-- Takes (or renews) a slot of a shared concurrency limit for a holder. A: name, holder,
-- lease_ms, max (configured maximum), wait ('1': a holder turned away joins the limit's
-- waiters, which a release wakes in order; '0': it does not). The live cap adapts (see
-- slot_throttle.lua) and recovers by one slot per recovery period without throttling.
-- Returns {1, in use, cap} when held, {0, in use, cap} when full.
local holder, lease, max = A.holder, tonumber(A.lease_ms), tonumber(A.max)
local zk = K.limit(A.name)
local ck = K.limit_cap(A.name)
redis.call('ZREMRANGEBYSCORE', zk, '-inf', now())
local c = redis.call('HMGET', ck, 'cap', 'recover_at', 'period')
local cap = tonumber(c[1]) or max
if cap > max then cap = max end
if cap < max and c[2] and now() >= tonumber(c[2]) then
  cap = cap + 1
  redis.call('HSET', ck, 'cap', cap, 'recover_at', now() + tonumber(c[3] or 30000))
end
local in_use = redis.call('ZCARD', zk)
if redis.call('ZSCORE', zk, holder) then
  redis.call('ZADD', zk, now() + lease, holder)
  return { 1, in_use, cap }
end
if in_use >= cap then
  if A.wait == '1' then redis.call('ZADD', K.limit_waiters(A.name), 'NX', now(), holder) end
  return { 0, in_use, cap }
end
redis.call('ZADD', zk, now() + lease, holder)
if A.wait == '1' then redis.call('ZREM', K.limit_waiters(A.name), holder) end
return { 1, in_use + 1, cap }
