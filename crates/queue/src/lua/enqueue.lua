-- Enqueues jobs. ARGV[4]: queue; ARGV[5]: idempotency TTL (s); ARGV[6]: batch ('' for none);
-- then per job 8 values: id, payload, prio, max_attempts, run_at_ms (0: now), idempotency key
-- ('' for none), estimated micros, traceparent ('' for none). Returns per job: 1 and its id
-- when written, 0 and the existing job's id when an idempotency key (or the same job id)
-- matched.
local queue, idem_ttl, batch = ARGV[4], ARGV[5], ARGV[6]
local delayed = P .. ':q:' .. queue .. ':delayed'
local out, index, batch_ids = {}, {}, {}
local n_written, est_total, n_queued, n_scheduled = 0, 0, 0, 0
for i = 7, #ARGV, 8 do
  local id, payload, prio, max_attempts = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local run_at, idem, est, trace = tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local jk = jobkey(id)
  local existing = nil
  if idem ~= '' then
    local ik = P .. ':idem:' .. queue .. ':' .. idem
    existing = redis.call('GET', ik)
    if not existing then
      if redis.call('EXISTS', jk) == 1 then
        existing = id
      else
        redis.call('SET', ik, id, 'EX', idem_ttl)
      end
    end
  elseif redis.call('EXISTS', jk) == 1 then
    existing = id
  end
  if existing then
    out[#out + 1] = 0
    out[#out + 1] = existing
  else
    local fields = { 'q', queue, 'payload', payload, 'prio', prio, 'attempts', 0,
      'max_attempts', max_attempts, 'created_ms', NOW, 'updated_ms', NOW, 'redrives', 0,
      'est_micros', est }
    if idem ~= '' then
      fields[#fields + 1] = 'idem'
      fields[#fields + 1] = idem
    end
    if trace ~= '' then
      fields[#fields + 1] = 'trace'
      fields[#fields + 1] = trace
    end
    if batch ~= '' then
      fields[#fields + 1] = 'batch'
      fields[#fields + 1] = batch
      batch_ids[#batch_ids + 1] = id
    end
    if run_at > NOW then
      redis.call('ZADD', delayed, run_at, id)
      for _, v in ipairs({ 'state', 'scheduled', 'run_at_ms', run_at, 'reason', 'waiting for its not-before time' }) do
        fields[#fields + 1] = v
      end
      n_scheduled = n_scheduled + 1
    else
      local entry = redis.call('XADD', readykey(queue, prio), '*', 'id', id)
      for _, v in ipairs({ 'state', 'queued', 'entry', entry }) do fields[#fields + 1] = v end
      n_queued = n_queued + 1
    end
    redis.call('HSET', jk, unpack(fields))
    index[#index + 1] = NOW
    index[#index + 1] = id
    n_written = n_written + 1
    est_total = est_total + tonumber(est)
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
if n_written > 0 then
  redis.call('ZADD', P .. ':q:' .. queue .. ':jobs', unpack(index))
end
if #batch_ids > 0 then
  local bk = P .. ':batch:' .. batch
  redis.call('RPUSH', bk .. ':jobs', unpack(batch_ids))
  redis.call('HINCRBY', bk, 'total', #batch_ids)
  redis.call('HINCRBY', bk, 'est_micros', est_total)
  if n_queued > 0 then redis.call('HINCRBY', bk, 'n:queued', n_queued) end
  if n_scheduled > 0 then redis.call('HINCRBY', bk, 'n:scheduled', n_scheduled) end
end
return out
