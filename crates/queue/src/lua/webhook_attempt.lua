-- Appends an attempt record to a webhook delivery's list, unless it is already the last one
-- (a retried call), keeps the newest A.kept records, and renews the list's expiry to the
-- retention. A: delivery (id), record, kept. Returns the list's length.
local key = K.webhook_attempts(A.delivery)
if redis.call('LINDEX', key, -1) ~= A.record then
  redis.call('RPUSH', key, A.record)
  redis.call('LTRIM', key, -tonumber(A.kept), -1)
end
redis.call('EXPIRE', key, RETENTION)
return redis.call('LLEN', key)
