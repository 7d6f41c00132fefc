-- Moves at most A.limit due jobs of queue A.queue from the delayed set to their ready
-- streams. Bounded work per call keeps a large delayed set from stalling Redis.
local dk = K.delayed(A.queue)
local ids = redis.call('ZRANGEBYSCORE', dk, '-inf', now(), 'LIMIT', 0, tonumber(A.limit))
if #ids > 0 then redis.call('ZREM', dk, unpack(ids)) end
for _, id in ipairs(ids) do
  local job = load_job(id)
  if job and not TERMINAL[job.state] then make_ready(job, '') end
end
return #ids
