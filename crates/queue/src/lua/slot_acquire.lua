-- Takes (or renews) a slot of a shared concurrency limit for a holder, in fair order between
-- tenants (prelude's FAIR). A: name, holder, tenant, micros (the run's estimated cost),
-- weight and tenant_max (the tenant's policy; tenant_max 0: none), rank (priority, 0 the
-- highest), lease_ms, max (configured maximum), wait ('1': a holder turned away joins its
-- tenant's waiters, and free slots go to waiters in fair order, possibly to others, which the
-- caller wakes; '0': a run that exists takes back a lapsed slot if one is free, charging
-- nothing). The live cap adapts (see
-- slot_throttle.lua). Returns {1 when held, in use, cap, why not ('' | 'full' | 'tenant' |
-- 'turn'), holders given a slot to wake...}.
local holder, lease, max = A.holder, tonumber(A.lease_ms), tonumber(A.max)
local name, tenant = A.name, A.tenant
local zk = K.limit(name)
FAIR.expire(name)
local cap = FAIR.cap(name, max)
-- The tenant's policy as its waiters' grants need it (a take-back carries none), and what a
-- release needs to hand slots on.
if A.wait == '1' then
  redis.call('HSET', K.limit_fair(name), 'policy:' .. tenant, A.weight .. ' ' .. A.tenant_max,
    'max', max, 'lease', lease)
else
  redis.call('HSET', K.limit_fair(name), 'max', max, 'lease', lease)
end
if redis.call('ZSCORE', zk, holder) then
  redis.call('ZADD', zk, now() + lease, holder)
  return { 1, redis.call('ZCARD', zk), cap, '' }
end
if A.wait ~= '1' then
  if redis.call('ZCARD', zk) < cap then
    FAIR.take(name, holder, tenant, tonumber(A.micros), lease, true)
    return { 1, redis.call('ZCARD', zk), cap, '' }
  end
  return { 0, redis.call('ZCARD', zk), cap, 'full' }
end
FAIR.join(name, holder, tenant, tonumber(A.micros), tonumber(A.rank))
local out = { 0, 0, cap, '' }
for _, granted in ipairs(FAIR.grant(name, cap, lease)) do
  if granted == holder then out[1] = 1 else out[#out + 1] = granted end
end
local in_use = redis.call('ZCARD', zk)
out[2] = in_use
if out[1] == 0 then
  if in_use >= cap then out[4] = 'full'
  elseif not FAIR.below_own_cap(name, tenant) then out[4] = 'tenant'
  else out[4] = 'turn' end
end
return out
