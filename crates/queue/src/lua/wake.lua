-- Wakes a job that waits in the delayed set (a parked generation whose run ended, a job
-- waiting for a provider slot): it is made ready now. A job a worker holds is flagged
-- instead, and its next park or defer makes it ready at once (settle.lua), so a wake that
-- races the job's settle is not lost. ARGV: job id, reason.
-- Returns 'woken', 'flagged', 'queued' (already on its ready stream) or 'gone'.
local id = ARGV[4]
local jk = jobkey(id)
local f = redis.call('HMGET', jk, 'state', 'q', 'entry', 'worker')
if not f[1] or TERMINAL[f[1]] then return 'gone' end
if redis.call('ZREM', P .. ':q:' .. f[2] .. ':delayed', id) == 1 then
  make_ready(jk, id, ARGV[5])
  return 'woken'
end
if f[3] and not f[4] then return 'queued' end
redis.call('HSET', jk, 'wake', 1)
return 'flagged'
