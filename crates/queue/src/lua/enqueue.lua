-- Enqueues jobs. A: queue, idem_ttl (s), batch ('' for none). ITEMS: id, payload, prio,
-- max_attempts, run_at_ms (0: now), idem (idempotency key, '' for none), est_micros, trace
-- ('' for none), tenant ('' for the default). Returns per job: 1 and its id when written, 0 and the existing job's id
-- when an idempotency key (or the same job id: a retried call) matched.
local queue, batch = A.queue, A.batch
local out, index, batch_ids = {}, {}, {}
local n_written, est_total, n_queued, n_scheduled = 0, 0, 0, 0
for _, job in ipairs(ITEMS) do
  local id = job.id
  local jk = K.job(id)
  local existing = nil
  if job.idem ~= '' then
    local ik = K.idempotency(queue, job.idem)
    existing = redis.call('GET', ik)
    if not existing then
      if redis.call('EXISTS', jk) == 1 then
        existing = id
      else
        redis.call('SET', ik, id, 'EX', A.idem_ttl)
      end
    end
  elseif redis.call('EXISTS', jk) == 1 then
    existing = id
  end
  if existing then
    out[#out + 1] = 0
    out[#out + 1] = existing
  else
    local fields = { 'q', queue, 'payload', job.payload, 'prio', job.prio, 'attempts', 0,
      'max_attempts', job.max_attempts, 'created_ms', now(), 'updated_ms', now(), 'redrives', 0,
      'est_micros', job.est_micros }
    if job.idem ~= '' then
      fields[#fields + 1] = 'idem'
      fields[#fields + 1] = job.idem
    end
    if job.trace ~= '' then
      fields[#fields + 1] = 'trace'
      fields[#fields + 1] = job.trace
    end
    local tenant = job.tenant ~= '' and job.tenant or 'default'
    if job.tenant ~= '' then
      fields[#fields + 1] = 'tenant'
      fields[#fields + 1] = tenant
    end
    count(K.stats(queue), 't:' .. tenant .. ':enqueued', 1)
    if batch ~= '' then
      fields[#fields + 1] = 'batch'
      fields[#fields + 1] = batch
      batch_ids[#batch_ids + 1] = id
    end
    local run_at = tonumber(job.run_at_ms)
    if run_at > now() then
      redis.call('ZADD', K.delayed(queue), run_at, id)
      for _, v in ipairs({ 'state', 'scheduled', 'run_at_ms', run_at, 'reason', 'waiting for its not-before time' }) do
        fields[#fields + 1] = v
      end
      n_scheduled = n_scheduled + 1
    else
      local entry = redis.call('XADD', K.ready(queue, job.prio), '*', 'id', id)
      for _, v in ipairs({ 'state', 'queued', 'entry', entry }) do fields[#fields + 1] = v end
      n_queued = n_queued + 1
    end
    if batch ~= '' then
      -- The state its batch counts it in (prelude's set_state).
      fields[#fields + 1] = 'bstate'
      fields[#fields + 1] = run_at > now() and 'scheduled' or 'queued'
    end
    redis.call('HSET', jk, unpack(fields))
    index[#index + 1] = now()
    index[#index + 1] = id
    n_written = n_written + 1
    est_total = est_total + tonumber(job.est_micros)
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
if n_written > 0 then
  redis.call('ZADD', K.jobs_index(queue), unpack(index))
end
if #batch_ids > 0 then
  local bk = K.batch(batch)
  redis.call('RPUSH', K.batch_jobs(batch), unpack(batch_ids))
  count(bk, 'total', #batch_ids)
  count(bk, 'est_micros', est_total)
  count(bk, 'n:queued', n_queued)
  count(bk, 'n:scheduled', n_scheduled)
end
return out
