-- Opens a batch. A: batch (id), info (JSON: webhook, budget, user fields), budget_micros,
-- queue, idem (batch idempotency key, '' for none), idem_ttl (s). A key seen before (within
-- its TTL) names the batch to open instead, so a retried submission resumes the first one
-- (opened again if its record is gone); a new key is claimed for this batch, with the TTL.
-- Returns the id of the batch opened.
local batch = A.batch
if A.idem ~= '' then
  local ik = K.batch_idempotency(A.queue, A.idem)
  local first = redis.call('GET', ik)
  if first then
    batch = first
  else
    redis.call('SET', ik, batch, 'EX', A.idem_ttl)
  end
end
local bk = K.batch(batch)
if redis.call('EXISTS', bk) == 0 then
  redis.call('HSET', bk, 'created_ms', now(), 'sealed', 0, 'total', 0, 'terminal', 0, 'done', 0,
    'est_micros', 0, 'charged_micros', 0, 'budget_micros', A.budget_micros, 'info', A.info)
  redis.call('ZADD', K.batches(), now(), batch)
end
return batch
