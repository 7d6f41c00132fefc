-- Records a provider callback for a run (partition 0) and returns {job id or '', duplicate}:
-- the job bound to the run, and 1 when a callback with this status was recorded already.
-- A callback for a run not bound yet is kept for `ttl_secs`: the job's binding reads it.
-- A: run, status, ttl_secs.
local rk = K.run(A.run)
local f = redis.call('HMGET', rk, 'job', 'cb')
local duplicate = 0
if f[2] == A.status then duplicate = 1 end
redis.call('HSET', rk, 'cb', A.status)
if not f[1] then redis.call('EXPIRE', rk, tonumber(A.ttl_secs)) end
return { f[1] or '', duplicate }
