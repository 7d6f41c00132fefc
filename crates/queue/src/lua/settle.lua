-- Settles deliveries after their handlers: finish, retry, defer or park (via the delayed
-- set), or release (back to ready). Only the consumer holding an entry may settle it
-- (prelude's `holds`). A parked job (its provider run generating) keeps its state and is
-- counted in the queue's `parked` stat until a worker takes it up again. A job woken while a
-- worker held it (wake.lua's flag) is made ready at once by a defer or park. A: consumer.
-- ITEMS: stream, entry, id, action, state (finish; park: '' keeps the job's), delay_ms, reason, error (JSON, '' for
-- none), checkpoint (JSON, '' keeps the saved one), event_id, event_type, event (JSON, ''
-- for none), charged_micros. Returns per item 'ok', 'gone' (already settled or cancelled) or
-- 'lost' (another consumer holds it).
local function settle_one(s)
  local job = load_job(s.id)
  local held = holds(job, s.entry, A.consumer)
  if held ~= 'ok' then return held end
  ack(s.stream, s.entry)
  local action = s.action
  local fields = {}
  if s.checkpoint ~= '' then
    fields[1] = 'checkpoint'
    fields[2] = s.checkpoint
  end
  if action == 'finish' then
    finish(job, s.state, s.reason, s.error,
      { id = s.event_id, type = s.event_type, body = s.event }, tonumber(s.charged_micros), fields)
    return 'ok'
  end
  -- Every other action gives the delivery up: the job waits (delayed set) or is made ready.
  local attempts = tonumber(job.attempts) or 0
  if action ~= 'retry' then attempts = attempts - 1 end
  fields[#fields + 1] = 'attempts'
  fields[#fields + 1] = attempts
  if s.error ~= '' then
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = s.error
  end
  if action == 'park' and s.state ~= '' then
    -- The step the handler reached just before parking, written with the park (the batch
    -- counts the job there from now, through set_state).
    job.state = s.state
  end
  local woken = job.wake and (action == 'park' or action == 'defer')
  if action == 'release' or woken then
    make_ready(job, s.reason, action == 'park', fields)
    return 'ok'
  end
  local due = now() + tonumber(s.delay_ms)
  redis.call('ZADD', K.delayed(job.q), due, job.id)
  fields = clearing(job, fields, CLEAR_WAITING)
  for _, v in ipairs({ 'run_at_ms', due, 'reason', s.reason }) do fields[#fields + 1] = v end
  if action == 'park' then
    -- Parked in the state its steps reached (a generation stays `generating`), or the one
    -- the settle names; its batch counts it there from now.
    count(K.stats(job.q), 'parked', 1)
    fields[#fields + 1] = 'parked'
    fields[#fields + 1] = 1
    set_state(job, job.state, fields)
  else
    set_state(job, 'scheduled', fields)
  end
  return 'ok'
end

local out = {}
for i, s in ipairs(ITEMS) do out[i] = settle_one(s) end
return out
