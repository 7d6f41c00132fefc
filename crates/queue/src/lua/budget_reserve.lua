-- Reserves a job's estimated cost against the daily budget and its batch's budget, once per
-- job and life. ARGV: job id, day (YYYYMMDD), micros, daily limit micros (0: none).
-- Returns {'ok'|'daily'|'batch', spent today, batch committed}.
local id, day, micros, daily = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local jk = jobkey(id)
local f = redis.call('HMGET', jk, 'reserved_micros', 'batch', 'q')
local dk = P .. ':budget:day:' .. day
if f[1] then
  return { 'ok', tonumber(redis.call('GET', dk) or 0), 0 }
end
local spent = tonumber(redis.call('GET', dk) or 0)
if daily > 0 and spent + micros > daily then return { 'daily', spent, 0 } end
local committed = 0
if f[2] then
  local bk = P .. ':batch:' .. f[2]
  local b = redis.call('HMGET', bk, 'budget_micros', 'committed_micros')
  local budget = tonumber(b[1] or 0)
  committed = tonumber(b[2] or 0)
  if budget > 0 and committed + micros > budget then return { 'batch', spent, committed } end
  committed = redis.call('HINCRBY', bk, 'committed_micros', micros)
end
spent = redis.call('INCRBY', dk, micros)
redis.call('EXPIRE', dk, 3 * 86400)
redis.call('HSET', jk, 'reserved_micros', micros)
redis.call('HINCRBY', P .. ':q:' .. (f[3] or 'videos') .. ':stats', 'reserved_micros', micros)
return { 'ok', spent, committed }
