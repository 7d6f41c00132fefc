-- Enqueues one job. ARGV: id, queue, payload, prio, max_attempts, run_at_ms (0: now),
-- idempotency key ('' for none), idempotency ttl (s), batch ('' for none), estimated micros.
-- Returns {1, id} when written, {0, existing id} when deduplicated.
local id, queue, payload, prio = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local max_attempts, run_at = ARGV[8], tonumber(ARGV[9])
local idem, idem_ttl, batch, est = ARGV[10], ARGV[11], ARGV[12], ARGV[13]
if idem ~= '' then
  local ik = P .. ':idem:' .. queue .. ':' .. idem
  local existing = redis.call('GET', ik)
  if existing then return { 0, existing } end
  redis.call('SET', ik, id, 'EX', idem_ttl)
end
local jk = jobkey(id)
if redis.call('EXISTS', jk) == 1 then return { 0, id } end
redis.call('HSET', jk, 'q', queue, 'payload', payload, 'prio', prio, 'attempts', 0,
  'max_attempts', max_attempts, 'created_ms', NOW, 'redrives', 0, 'est_micros', est)
if idem ~= '' then redis.call('HSET', jk, 'idem', idem) end
if batch ~= '' then
  local bk = P .. ':batch:' .. batch
  redis.call('HSET', jk, 'batch', batch)
  redis.call('RPUSH', bk .. ':jobs', id)
  redis.call('HINCRBY', bk, 'total', 1)
  redis.call('HINCRBY', bk, 'est_micros', est)
end
redis.call('ZADD', P .. ':q:' .. queue .. ':jobs', NOW, id)
if run_at > NOW then
  redis.call('ZADD', P .. ':q:' .. queue .. ':delayed', run_at, id)
  redis.call('HSET', jk, 'run_at_ms', run_at, 'reason', 'waiting for its not-before time')
  set_state(jk, 'scheduled')
else
  make_ready(jk, id)
end
return { 1, id }
