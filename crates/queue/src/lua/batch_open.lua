-- Opens a batch. ARGV: batch id, info JSON (webhook, budget, user fields), budget micros.
local batch, info, budget = ARGV[4], ARGV[5], ARGV[6]
local bk = P .. ':batch:' .. batch
if redis.call('EXISTS', bk) == 1 then return 0 end
redis.call('HSET', bk, 'created_ms', NOW, 'sealed', 0, 'total', 0, 'terminal', 0, 'done', 0,
  'est_micros', 0, 'charged_micros', 0, 'budget_micros', budget, 'info', info)
redis.call('ZADD', P .. ':batches', NOW, batch)
return 1
