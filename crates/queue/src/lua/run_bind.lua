-- Binds a provider run to its job (partition 0: a callback names only the run), so that the
-- run's callback can wake the job, and returns the status of a callback that arrived before
-- the binding ('' when none): the job then polls at once instead of parking.
-- A: run, job, ttl_secs.
local rk = K.run(A.run)
redis.call('HSET', rk, 'job', A.job)
redis.call('EXPIRE', rk, tonumber(A.ttl_secs))
return redis.call('HGET', rk, 'cb') or ''
