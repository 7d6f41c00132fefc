-- Shared prelude of every klingq queue script. Each script is this prelude followed by its body.
-- ARGV[1]: the hash-tagged key prefix `{ns}`; ARGV[2]: retention of finished records in
-- seconds; ARGV[3]: approximate maximum length of the events stream. A script's own arguments
-- start at ARGV[4]. Every key a script touches is under the prefix, so it lives in one
-- Cluster slot with KEYS[1], which routes the call.
local P = ARGV[1]
local RETENTION = tonumber(ARGV[2])
local MAXLEN = ARGV[3]
local GROUP = 'workers'
local TERMINAL = { succeeded = true, failed = true, cancelled = true, dead = true }
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)

local function jobkey(id) return P .. ':job:' .. id end
local function readykey(queue, prio) return P .. ':q:' .. queue .. ':ready:' .. prio end

-- RFC 3339 UTC time of epoch milliseconds (Redis' Lua has no os.date).
local function iso(ms)
  local secs = math.floor(ms / 1000)
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, ms % 1000)
end

-- `trace`: the subject job's traceparent, which its webhook deliveries continue (false: none).
local function append_event(event_id, event_type, subject, body, trace)
  local entry = { P .. ':events', 'MAXLEN', '~', MAXLEN, '*',
    'id', event_id, 'type', event_type, 'subject', subject, 'event', body }
  if trace then
    entry[#entry + 1] = 'trace'
    entry[#entry + 1] = trace
  end
  redis.call('XADD', unpack(entry))
end

-- Marks a batch done once it is sealed and every job in it is terminal, and publishes
-- `batch.completed` exactly once per completion.
local function check_batch_done(batch)
  local bk = P .. ':batch:' .. batch
  local b = redis.call('HMGET', bk, 'sealed', 'total', 'terminal', 'done')
  if b[1] ~= '1' or b[4] == '1' or tonumber(b[3] or 0) < tonumber(b[2] or 0) then return end
  redis.call('HSET', bk, 'done', 1, 'finished_ms', NOW)
  local completions = redis.call('HINCRBY', bk, 'completions', 1)
  local all = redis.call('HGETALL', bk)
  local counts, est, charged = {}, 0, 0
  for i = 1, #all, 2 do
    local k, v = all[i], all[i + 1]
    if string.sub(k, 1, 2) == 'n:' then
      local n = tonumber(v)
      if n ~= 0 then counts[string.sub(k, 3)] = n end
    elseif k == 'est_micros' then est = tonumber(v)
    elseif k == 'charged_micros' then charged = tonumber(v) end
  end
  local event_id = 'evt_batch_' .. batch .. '_' .. (completions - 1)
  local body = cjson.encode({ id = event_id, type = 'batch.completed', timestamp = iso(NOW),
    data = { batch_id = batch, total = tonumber(b[2]), counts = counts,
      estimated_usd = est / 1e6, charged_usd = charged / 1e6 } })
  append_event(event_id, 'batch.completed', batch, body, false)
  redis.call('EXPIRE', bk, RETENTION)
  redis.call('EXPIRE', bk .. ':jobs', RETENTION)
end

-- Keeps a batch's per-state counters when one of its jobs moves from `old` to `new_state`.
local function count_transition(batch, old, new_state)
  if old == new_state or not batch then return end
  local bk = P .. ':batch:' .. batch
  if old then redis.call('HINCRBY', bk, 'n:' .. old, -1) end
  redis.call('HINCRBY', bk, 'n:' .. new_state, 1)
  local was_terminal = old and TERMINAL[old]
  if TERMINAL[new_state] and not was_terminal then
    redis.call('HINCRBY', bk, 'terminal', 1)
    check_batch_done(batch)
  elseif was_terminal and not TERMINAL[new_state] then
    redis.call('HINCRBY', bk, 'terminal', -1)
    redis.call('HSET', bk, 'done', 0)
    redis.call('PERSIST', bk)
    redis.call('PERSIST', bk .. ':jobs')
  end
end

-- Moves a job to a state (with extra hash fields), keeping its batch's counters; returns the
-- old state. `old` and `batch` may be passed when the caller has read them already.
local function set_state(jk, new_state, fields, old, batch)
  if old == nil then
    local f = redis.call('HMGET', jk, 'state', 'batch')
    old, batch = f[1], f[2]
  end
  fields = fields or {}
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = new_state
  fields[#fields + 1] = 'updated_ms'
  fields[#fields + 1] = NOW
  redis.call('HSET', jk, unpack(fields))
  count_transition(batch or nil, old or nil, new_state)
  return old
end

-- Puts a job on its ready stream and records the entry. A parked job (settle.lua's `park`)
-- leaves the parked count and keeps its state (a generation stays `generating`: it is only
-- due for its next poll), as does one made ready with `keep`.
local function make_ready(jk, id, reason, keep)
  local f = redis.call('HMGET', jk, 'q', 'prio', 'state', 'batch', 'parked')
  local entry = redis.call('XADD', readykey(f[1], f[2]), '*', 'id', id)
  redis.call('HDEL', jk, 'run_at_ms', 'worker', 'parked')
  if f[5] then redis.call('HINCRBY', P .. ':q:' .. f[1] .. ':stats', 'parked', -1) end
  local state = 'queued'
  if (keep or f[5]) and f[3] then state = f[3] end
  set_state(jk, state, { 'entry', entry, 'reason', reason or '' }, f[3] or false, f[4] or false)
  return entry
end

-- Takes a parked job out of the parked count (it is cancelled where it waits).
local function unpark(jk, q)
  if redis.call('HDEL', jk, 'parked') == 1 then
    redis.call('HINCRBY', P .. ':q:' .. q .. ':stats', 'parked', -1)
  end
end

-- Ends a job: terminal state, error, charge, dead-letter index, event, retention.
-- `job` holds the fields the caller read: state, q, batch.
local function finish(jk, id, job, state, reason, err, event_id, event_type, event, charged)
  if charged > 0 then
    redis.call('HINCRBY', jk, 'charged_micros', charged)
    if job.batch then redis.call('HINCRBY', P .. ':batch:' .. job.batch, 'charged_micros', charged) end
  end
  redis.call('HDEL', jk, 'entry', 'worker', 'run_at_ms', 'wake')
  local fields = { 'finished_ms', NOW, 'reason', reason }
  if err ~= '' then
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = err
  end
  if state == 'dead' then redis.call('ZADD', P .. ':q:' .. job.q .. ':dead', NOW, id) end
  -- Per-queue counters, for metrics from any process.
  local stats = P .. ':q:' .. job.q .. ':stats'
  redis.call('HINCRBY', stats, 'finished:' .. state, 1)
  if charged > 0 then redis.call('HINCRBY', stats, 'charged_micros', charged) end
  if event ~= '' then append_event(event_id, event_type, id, event, redis.call('HGET', jk, 'trace')) end
  set_state(jk, state, fields, job.state or false, job.batch or false)
  redis.call('EXPIRE', jk, RETENTION)
end

-- The lease check: the entry is pending and held by this consumer.
local function owner_of(stream, entry)
  local p = redis.call('XPENDING', stream, GROUP, entry, entry, 1)
  if #p == 0 then return nil end
  return p[1][2]
end
