-- Re-drives a dead job, or a failed one (by id: a failure an operator fixed, such as a
-- download refused by the allow-list): attempts reset, a new life (redrives + 1), back on its
-- ready stream. The checkpoint stays, so a job whose paid run is kept downloads it again and
-- never pays twice. A: id, queue. Returns 'redriven', the job's state when it was not
-- re-driven, or '' if missing or a job of another queue (a webhook delivery is not a video
-- job).
local job = load_job(A.id, { 'redrives' })
if not job or job.q ~= A.queue then return '' end
if job.state ~= 'dead' and job.state ~= 'failed' then return job.state end
redis.call('ZREM', K.dead(job.q), job.id)
-- Its tenant's active count (enqueued + re-driven - finished) takes it back.
count(K.stats(job.q), 't:' .. job.tenant .. ':redriven', 1)
redis.call('PERSIST', job.key)
make_ready(job, 're-driven', false, { 'attempts', 0, 'redrives', (tonumber(job.redrives) or 0) + 1,
  'error', '', 'finished_ms', '' })
return 'redriven'
