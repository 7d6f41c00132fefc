-- Resumes a paused batch: its held jobs (budget_reserve.lua) are made ready now (a job a
-- worker holds is flagged, so its defer makes it ready at once), and its failure guard counts
-- again from here. A: batch. Returns the number of jobs woken or flagged, or -1 when the batch
-- does not exist.
local bk = K.batch(A.batch)
local b = redis.call('HMGET', bk, 'created_ms', 'n:failed', 'terminal')
if not b[1] then return -1 end
redis.call('HSET', bk, 'paused', 0, 'pause_reason', '', 'guard_base_failed', b[2] or 0,
  'guard_base_terminal', b[3] or 0)
local hk = K.batch_held(A.batch)
local n = 0
for _, id in ipairs(redis.call('ZRANGE', hk, 0, -1)) do
  local job = load_job(id)
  if job and not TERMINAL[job.state] then
    if redis.call('ZREM', K.delayed(job.q), id) == 1 then
      make_ready(job, 'its batch was resumed')
      n = n + 1
    elseif not (job.entry and not job.worker) then
      redis.call('HSET', job.key, 'wake', 1)
      n = n + 1
    end
  end
end
redis.call('DEL', hk)
return n
