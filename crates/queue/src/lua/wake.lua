-- Wakes a job that waits in the delayed set (a parked generation whose run ended, a job
-- waiting for a provider slot): it is made ready now. A job a worker holds is flagged
-- instead, and its next park or defer makes it ready at once (settle.lua), so a wake that
-- races the job's settle is not lost. A: id, reason.
-- Returns 'woken', 'flagged', 'queued' (already on its ready stream) or 'gone'.
local job = load_job(A.id)
if not job or TERMINAL[job.state] then return 'gone' end
if redis.call('ZREM', K.delayed(job.q), job.id) == 1 then
  make_ready(job, A.reason)
  return 'woken'
end
if job.entry and not job.worker then return 'queued' end
redis.call('HSET', job.key, 'wake', 1)
return 'flagged'
