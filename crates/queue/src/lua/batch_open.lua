-- Opens a batch. A: batch (id), info (JSON: webhook, budget, tenant, the failure guard
-- `max_failure_rate`, `min_finished`, `max_failed` (see prelude's check_batch_guard), user
-- fields), budget_micros,
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
  local info = cjson.decode(A.info)
  if type(info) == 'table' then
    local rate, min, failed = tonumber(info.max_failure_rate), tonumber(info.min_finished),
      tonumber(info.max_failed)
    if (rate and rate > 0) or (failed and failed > 0) then
      redis.call('HSET', bk, 'guard_rate', string.format('%g', rate or 0), 'guard_min', min or 20,
        'guard_failed', failed or 0)
    end
  end
end
return batch
