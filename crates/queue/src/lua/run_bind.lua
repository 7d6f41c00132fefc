-- Binds a provider run to its job (partition 0: a callback names only the run), so that the
-- run's callback can wake the job, and returns the status of a callback that arrived before
-- the binding ('' when none): the job then polls at once instead of parking.
-- ARGV: run id, job id, ttl seconds. Key shape: Keys::run (keep the two in step).
local rk = P .. ':run:' .. ARGV[4]
redis.call('HSET', rk, 'job', ARGV[5])
redis.call('EXPIRE', rk, tonumber(ARGV[6]))
return redis.call('HGET', rk, 'cb') or ''
