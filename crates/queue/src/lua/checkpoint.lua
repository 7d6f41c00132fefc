-- Writes a running job's state (a step: its batch counts it when the delivery ends) and
-- checkpoint, only while this consumer holds it (prelude's `holds`). Leases are renewed by the worker's keeper, not here. A: stream, entry, consumer,
-- id, state, checkpoint (JSON, '' keeps it), reason. Returns 'ok', 'cancelled', 'lost' or
-- 'gone'.
local job = load_job(A.id)
if job and job.state == 'cancelled' then return 'cancelled' end
local held = holds(job, A.entry, A.consumer)
if held ~= 'ok' then return held end
local fields = { 'reason', A.reason }
if A.checkpoint ~= '' then
  fields[#fields + 1] = 'checkpoint'
  fields[#fields + 1] = A.checkpoint
end
-- When the job's run was asked for: a batch learns how long its runs hold a slot (finish).
if A.state == 'submitting' then
  fields[#fields + 1] = 'submitted_ms'
  fields[#fields + 1] = now()
end
set_state(job, A.state, fields, true)
return 'ok'
