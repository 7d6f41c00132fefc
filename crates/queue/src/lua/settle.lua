-- Settles deliveries after their handlers: finish, retry, defer or park (via the delayed
-- set), or release (back to ready). A parked job (its provider run generating) keeps its
-- state and is counted in the queue's `parked` stat until a worker takes it up again. A job
-- woken while a worker held it (wake.lua's flag) is made ready at once by a defer or park. Only the consumer holding an entry may settle it. Settles arrive
-- in groups of 13 values from ARGV[4]: stream, entry, consumer, id, action, state, delay_ms,
-- reason, error JSON, event id, event type, event JSON, charged micros. Returns per group
-- 'ok', 'gone' (already settled or cancelled) or 'lost' (another consumer holds it).
local function settle_one(i)
  local stream, entry, consumer, id, action = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local state, delay, reason, err = ARGV[i + 5], tonumber(ARGV[i + 6]), ARGV[i + 7], ARGV[i + 8]
  local event_id, event_type, event, charged = ARGV[i + 9], ARGV[i + 10], ARGV[i + 11], tonumber(ARGV[i + 12])
  local owner = owner_of(stream, entry)
  if not owner then return 'gone' end
  if owner ~= consumer then return 'lost' end
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
  local jk = jobkey(id)
  local f = redis.call('HMGET', jk, 'state', 'q', 'batch', 'wake')
  local job = { state = f[1], q = f[2], batch = f[3] }
  if not job.state or TERMINAL[job.state] then return 'gone' end
  if action == 'finish' then
    finish(jk, id, job, state, reason, err, event_id, event_type, event, charged)
  elseif action == 'park' then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('HDEL', jk, 'entry', 'worker', 'wake')
    if f[4] then
      make_ready(jk, id, reason, true)
    else
      redis.call('HINCRBY', P .. ':q:' .. job.q .. ':stats', 'parked', 1)
      redis.call('ZADD', P .. ':q:' .. job.q .. ':delayed', NOW + delay, id)
      redis.call('HSET', jk, 'parked', 1, 'run_at_ms', NOW + delay, 'reason', reason, 'updated_ms', NOW)
    end
  elseif action == 'retry' or action == 'defer' then
    if action == 'defer' then redis.call('HINCRBY', jk, 'attempts', -1) end
    redis.call('HDEL', jk, 'entry', 'worker', 'wake')
    local fields = { 'run_at_ms', NOW + delay, 'reason', reason }
    if err ~= '' then
      fields[#fields + 1] = 'error'
      fields[#fields + 1] = err
    end
    if action == 'defer' and f[4] then
      make_ready(jk, id, reason)
      return 'ok'
    end
    redis.call('ZADD', P .. ':q:' .. job.q .. ':delayed', NOW + delay, id)
    set_state(jk, 'scheduled', fields, job.state, job.batch)
  elseif action == 'release' then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('HDEL', jk, 'worker', 'wake')
    make_ready(jk, id, reason)
  end
  return 'ok'
end

local out = {}
for i = 4, #ARGV, 13 do
  out[#out + 1] = settle_one(i)
end
return out
