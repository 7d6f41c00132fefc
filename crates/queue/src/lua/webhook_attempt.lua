-- Appends an attempt record to a webhook delivery's list, unless it is already the last one
-- (a retried call), keeps the newest ARGV[6] records, and renews the list's expiry to the
-- retention. ARGV: delivery id, record, records kept. Returns the list's length.
local id, record, kept = ARGV[4], ARGV[5], tonumber(ARGV[6])
local key = P .. ':webhooks:attempts:' .. id
if redis.call('LINDEX', key, -1) ~= record then
  redis.call('RPUSH', key, record)
  redis.call('LTRIM', key, -kept, -1)
end
redis.call('EXPIRE', key, RETENTION)
return redis.call('LLEN', key)
