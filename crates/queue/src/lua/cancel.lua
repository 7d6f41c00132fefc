-- Cancels a job that is not terminal, wherever it is (ready, delayed or held by a worker,
-- whose next checkpoint then sees 'cancelled'). A: id, reason, error (JSON), event_id,
-- event_type, event (JSON). Returns {outcome, previous state}.
local job = load_job(A.id)
if not job then return { 'missing', '' } end
local previous = job.state
if TERMINAL[previous] then return { 'terminal', previous } end
if job.entry then
  local stream = K.ready(job.q, job.prio or 'normal')
  ack(stream, job.entry)
end
redis.call('ZREM', K.delayed(job.q), job.id)
local fields = unpark(job, {})
finish(job, 'cancelled', A.reason, A.error,
  { id = A.event_id, type = A.event_type, body = A.event }, 0, fields)
return { 'cancelled', previous }
