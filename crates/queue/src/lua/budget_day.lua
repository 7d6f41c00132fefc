-- The daily budget's side of a reservation for a job outside partition 0 (whose job and batch
-- live in another slot): once per job and day, so a retried reservation counts once.
-- A: id, day (YYYYMMDD), micros, daily (limit in micros, 0: none), tenant, tenant_daily (the
-- tenant's limit, 0: none), op ('reserve' or 'release'). Returns {'ok'|'daily'|'tenant',
-- spent today (the tenant's for 'tenant'), 1 when this call reserved (else 0)}.
local micros, daily = tonumber(A.micros), tonumber(A.daily)
local dk = K.daily_budget(A.day)
local jobs = K.daily_budget_jobs(A.day)
local tk = K.tenant_day(A.day)
if A.op == 'release' then
  if redis.call('HDEL', jobs, A.id) == 1 then
    redis.call('DECRBY', dk, micros)
    redis.call('HINCRBY', tk, A.tenant, -micros)
  end
  return { 'ok', tonumber(redis.call('GET', dk) or 0), 0 }
end
local spent = tonumber(redis.call('GET', dk) or 0)
if redis.call('HEXISTS', jobs, A.id) == 1 then return { 'ok', spent, 0 } end
if daily > 0 and spent + micros > daily then return { 'daily', spent, 0 } end
local tenant_daily = tonumber(A.tenant_daily)
if tenant_daily > 0 then
  local tenant_spent = tonumber(redis.call('HGET', tk, A.tenant) or 0)
  if tenant_spent + micros > tenant_daily then return { 'tenant', tenant_spent, 0 } end
end
spent = redis.call('INCRBY', dk, micros)
redis.call('HINCRBY', tk, A.tenant, micros)
redis.call('EXPIRE', tk, 3 * 86400, 'NX')
redis.call('HSET', jobs, A.id, micros)
-- Both keys expire three days after they were made (the total may have been made by a job of
-- partition 0; NX: Redis 7).
if spent == micros then redis.call('EXPIRE', dk, 3 * 86400) end
redis.call('EXPIRE', jobs, 3 * 86400, 'NX')
return { 'ok', spent, 1 }
