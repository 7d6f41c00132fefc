-- Records a provider callback for a run (partition 0) and returns {job id or '', duplicate}:
-- the job bound to the run, and 1 when a callback with this status was recorded already.
-- A callback for a run not bound yet is kept for `ttl` seconds: the job's binding reads it.
-- ARGV: run id, status, ttl seconds. Key shape: Keys::run (keep the two in step).
local rk = P .. ':run:' .. ARGV[4]
local f = redis.call('HMGET', rk, 'job', 'cb')
local duplicate = 0
if f[2] == ARGV[5] then duplicate = 1 end
redis.call('HSET', rk, 'cb', ARGV[5])
if not f[1] then redis.call('EXPIRE', rk, tonumber(ARGV[6])) end
return { f[1] or '', duplicate }
