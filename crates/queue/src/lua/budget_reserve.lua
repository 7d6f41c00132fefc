-- Reserves a job's estimated cost against its batch's budget and (mode 'all') the daily
-- budget and its tenant's, once per job and life. A: id, day (YYYYMMDD), micros, daily (limit
-- in micros, 0: none), tenant, tenant_daily (the tenant's limit in micros, 0: none), mode: 'all' (the job lives in partition 0, with the daily budget), 'check' (only
-- whether the job reserved already: 'already' or 'go') or 'partition' (the daily side was
-- reserved by budget_day.lua in partition 0).
-- Returns {'ok'|'daily'|'tenant'|'batch'|'paused'|'already'|'go', spent today (mode 'all'; the
-- tenant's for 'tenant'), batch committed}.
local micros, daily, mode = tonumber(A.micros), tonumber(A.daily), A.mode
local all = mode == 'all'
local jk = K.job(A.id)
local f = redis.call('HMGET', jk, 'reserved_micros', 'batch', 'q')
-- A paused batch submits nothing: the job is held until the batch is resumed.
if f[2] and redis.call('HGET', K.batch(f[2]), 'paused') == '1' then
  local hk = K.batch_held(f[2])
  redis.call('ZADD', hk, now(), A.id)
  redis.call('EXPIRE', hk, RETENTION)
  return { 'paused', 0, 0 }
end
local dk = K.daily_budget(A.day)
if f[1] then
  if not all then return { 'already', 0, 0 } end
  return { 'ok', tonumber(redis.call('GET', dk) or 0), 0 }
end
if mode == 'check' then return { 'go', 0, 0 } end
local spent = 0
if all and daily > 0 then
  spent = tonumber(redis.call('GET', dk) or 0)
  if spent + micros > daily then return { 'daily', spent, 0 } end
end
local tk = K.tenant_day(A.day)
local tenant_daily = tonumber(A.tenant_daily)
if all and tenant_daily > 0 then
  local tenant_spent = tonumber(redis.call('HGET', tk, A.tenant) or 0)
  if tenant_spent + micros > tenant_daily then return { 'tenant', tenant_spent, 0 } end
end
local committed = 0
if f[2] then
  local bk = K.batch(f[2])
  local b = redis.call('HMGET', bk, 'budget_micros', 'committed_micros')
  local budget = tonumber(b[1] or 0)
  committed = tonumber(b[2] or 0)
  if budget > 0 and committed + micros > budget then return { 'batch', spent, committed } end
  committed = redis.call('HINCRBY', bk, 'committed_micros', micros)
end
if all then
  spent = redis.call('INCRBY', dk, micros)
  if spent == micros then redis.call('EXPIRE', dk, 3 * 86400) end
  redis.call('HINCRBY', tk, A.tenant, micros)
  redis.call('EXPIRE', tk, 3 * 86400, 'NX')
end
redis.call('HSET', jk, 'reserved_micros', micros)
count(K.stats(f[3] or 'videos'), 'reserved_micros', micros)
return { 'ok', spent, committed }
