-- Opens a batch. ARGV: batch id, info JSON (webhook, budget, user fields), budget micros,
-- queue, batch idempotency key ('' for none), its TTL (s). A key seen before (within its TTL)
-- names the batch to open instead, so a retried submission resumes the first one (opened
-- again if its record is gone); a new key is claimed for this batch, with the TTL. Returns
-- the id of the batch opened.
local batch, info, budget = ARGV[4], ARGV[5], ARGV[6]
local queue, idem, idem_ttl = ARGV[7], ARGV[8], ARGV[9]
if idem ~= '' then
  local ik = P .. ':idem-batch:' .. queue .. ':' .. idem
  local first = redis.call('GET', ik)
  if first then
    batch = first
  else
    redis.call('SET', ik, batch, 'EX', idem_ttl)
  end
end
local bk = P .. ':batch:' .. batch
if redis.call('EXISTS', bk) == 0 then
  redis.call('HSET', bk, 'created_ms', NOW, 'sealed', 0, 'total', 0, 'terminal', 0, 'done', 0,
    'est_micros', 0, 'charged_micros', 0, 'budget_micros', budget, 'info', info)
  redis.call('ZADD', P .. ':batches', NOW, batch)
end
return batch
