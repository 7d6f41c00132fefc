-- Moves at most ARGV[5] due jobs of queue ARGV[4] from the delayed set to their ready
-- streams. Bounded work per call keeps a large delayed set from stalling Redis.
local queue, limit = ARGV[4], tonumber(ARGV[5])
local dk = P .. ':q:' .. queue .. ':delayed'
local ids = redis.call('ZRANGEBYSCORE', dk, '-inf', NOW, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZREM', dk, id)
  local jk = jobkey(id)
  local state = redis.call('HGET', jk, 'state')
  if state and not TERMINAL[state] then make_ready(jk, id, '') end
end
return #ids
