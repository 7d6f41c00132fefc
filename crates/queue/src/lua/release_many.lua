-- Puts entries this consumer holds but never ran back on their streams, taking back the
-- attempt the start script counted (shutdown). A: consumer. ITEMS: stream, entry, id.
-- Returns how many.
local n = 0
for _, item in ipairs(ITEMS) do
  if owner_of(item.stream, item.entry) == A.consumer then
    ack(item.stream, item.entry)
    local job = load_job(item.id)
    if job and not TERMINAL[job.state] and job.entry == item.entry then
      make_ready(job, 'released by a stopping worker', false,
        { 'attempts', (tonumber(job.attempts) or 1) - 1 })
      n = n + 1
    end
  end
end
return n
