-- Starts delivered entries: counts the attempt durably before any handler runs, records the
-- consumer (the lease check of checkpoints and settles, prelude's `holds`), and drops
-- entries whose job is gone, finished, or re-queued under a newer entry.
-- A: consumer. ITEMS: stream, entry, id.
-- Returns rows (reply_rows) of the started entries.
local rows = {}
local EXTRA = { 'max_attempts', 'payload', 'redrives', 'checkpoint', 'created_ms' }
for _, item in ipairs(ITEMS) do
  local job = load_job(item.id, EXTRA)
  if not job or TERMINAL[job.state] or job.entry ~= item.entry then
    ack(item.stream, item.entry)
  else
    local attempts = (tonumber(job.attempts) or 0) + 1
    redis.call('HSET', job.key, 'attempts', attempts, 'worker', A.consumer, 'started_ms', now())
    rows[#rows + 1] = { entry = item.entry, id = item.id, attempts = attempts,
      max_attempts = job.max_attempts, payload = job.payload, batch = job.batch,
      redrives = job.redrives, checkpoint = job.checkpoint, created_ms = job.created_ms,
      state = job.state, prio = job.prio, trace = job.trace }
  end
end
return reply_rows({ 'entry', 'id', 'attempts', 'max_attempts', 'payload', 'batch', 'redrives',
  'checkpoint', 'created_ms', 'state', 'prio', 'trace' }, rows)
