-- Shared prelude of every klingq queue script. Each script is the key functions generated
-- from keys.rs (`K.job(id)`, …), this prelude and its body, run as `main()`; counters the
-- body changed are written once each when it returns (flush).
-- ARGV[1]: the hash-tagged key prefix `{ns}` (the generated key functions read `P`);
-- ARGV[2]: retention of finished records in seconds; ARGV[3]: approximate maximum length of
-- the events stream; then the call's records (read_records). Every key a script touches is
-- under the prefix, so it lives in one Cluster slot with KEYS[1], which routes the call.
local RETENTION = tonumber(ARGV[2])
local MAXLEN = ARGV[3]
local GROUP = 'workers'
local TERMINAL = { succeeded = true, failed = true, cancelled = true, dead = true }
-- The server's time in ms (one clock for every replica), read once, when first needed.
local NOW_MS
local function now()
  if not NOW_MS then
    local t = redis.call('TIME')
    NOW_MS = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW_MS
end

-- The call's records (klingq_queue::wire): a header record `A` and item records `ITEMS`,
-- each list sent as its field count, its field names, then the values. A record reads its
-- fields by name straight from ARGV (a small table and a shared metatable, no copy of its
-- values); reading a field the Rust side did not send is an error, not a silent nil.
local function read_records(at, one)
  local n = tonumber(ARGV[at])
  if not n then return {}, at end
  local index = {}
  for k = 1, n do index[ARGV[at + k]] = k - 1 end
  local fields = { __index = function(record, name)
    local k = index[name]
    if not k then error('klingq: this call sends no field ' .. tostring(name)) end
    return ARGV[record[1] + k]
  end }
  local records = {}
  local i = at + n + 1
  if n == 0 then
    if one then records[1] = setmetatable({ i }, fields) end
    return records, i
  end
  local last = #ARGV - n + 1
  while i <= last do
    records[#records + 1] = setmetatable({ i }, fields)
    i = i + n
    if one then break end
  end
  return records, i
end
local A, ITEMS
do
  local header, next_at = read_records(4, true)
  A = header[1] or setmetatable({}, { __index = function(_, name)
    error('klingq: this call sends no field ' .. tostring(name))
  end })
  ITEMS = read_records(next_at)
end

-- Rows for wire::Rows: the field count, the names, then each row's values in that order
-- (a missing value is sent as nil).
local function reply_rows(names, rows)
  local out = { #names }
  for _, name in ipairs(names) do out[#out + 1] = name end
  for _, row in ipairs(rows) do
    for _, name in ipairs(names) do
      local v = row[name]
      if v == nil then v = false end
      out[#out + 1] = v
    end
  end
  return out
end

-- Hash counters changed by the call, summed and written once per key and field when the
-- script returns: a settle of many jobs of one batch writes the batch's counters once.
local COUNTS = {}
local function count(key, field, n)
  local fields = COUNTS[key]
  if not fields then
    fields = {}
    COUNTS[key] = fields
  end
  fields[field] = (fields[field] or 0) + n
end

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
  local entry = { K.events(), 'MAXLEN', '~', MAXLEN, '*',
    'id', event_id, 'type', event_type, 'subject', subject, 'event', body }
  if trace then
    entry[#entry + 1] = 'trace'
    entry[#entry + 1] = trace
  end
  redis.call('XADD', unpack(entry))
end

-- Marks a batch done once it is sealed and every job in it is terminal, and publishes
-- `batch.completed` exactly once per completion. Its counters must be written first.
local function check_batch_done(batch)
  local bk = K.batch(batch)
  local b = redis.call('HMGET', bk, 'sealed', 'total', 'terminal', 'done')
  if b[1] ~= '1' or b[4] == '1' or tonumber(b[3] or 0) < tonumber(b[2] or 0) then return end
  redis.call('HSET', bk, 'done', 1, 'finished_ms', now())
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
  local body = cjson.encode({ id = event_id, type = 'batch.completed', timestamp = iso(now()),
    data = { batch_id = batch, total = tonumber(b[2]), counts = counts,
      estimated_usd = est / 1e6, charged_usd = charged / 1e6 } })
  append_event(event_id, 'batch.completed', batch, body, false)
  redis.call('EXPIRE', bk, RETENTION)
  redis.call('EXPIRE', K.batch_jobs(batch), RETENTION)
end

-- Pauses a batch whose failure guard is exceeded, once, with a `batch.paused` event: its
-- waiting jobs are not submitted (budget_reserve.lua holds them) until it is resumed
-- (batch_resume.lua). The guard counts permanent failures (state `failed`: moderation,
-- invalid input, …; not `dead`, which transient errors exhaust) since the last resume:
-- more than `guard_failed`, or a share above `guard_rate` once `guard_min` jobs finished.
local function check_batch_guard(batch)
  local bk = K.batch(batch)
  local b = redis.call('HMGET', bk, 'guard_rate', 'guard_min', 'guard_failed', 'paused',
    'n:failed', 'terminal', 'guard_base_failed', 'guard_base_terminal')
  local rate, min, max_failed = tonumber(b[1] or 0), tonumber(b[2] or 0), tonumber(b[3] or 0)
  if (rate <= 0 and max_failed <= 0) or b[4] == '1' then return end
  local failed = tonumber(b[5] or 0) - tonumber(b[7] or 0)
  local finished = tonumber(b[6] or 0) - tonumber(b[8] or 0)
  local reason
  if max_failed > 0 and failed > max_failed then
    reason = failed .. ' jobs failed, more than max_failed ' .. max_failed
  elseif rate > 0 and finished >= math.max(min, 1) and failed / finished > rate then
    reason = failed .. ' of ' .. finished .. ' finished jobs failed, more than max_failure_rate '
      .. b[1]
  end
  if not reason then return end
  local pauses = redis.call('HINCRBY', bk, 'pauses', 1)
  redis.call('HSET', bk, 'paused', 1, 'paused_ms', now(), 'pause_reason', reason)
  local event_id = 'evt_batch_' .. batch .. '_paused_' .. (pauses - 1)
  local body = cjson.encode({ id = event_id, type = 'batch.paused', timestamp = iso(now()),
    data = { batch_id = batch, reason = reason, failed = failed, finished = finished } })
  append_event(event_id, 'batch.paused', batch, body, false)
end

-- Batches one of whose jobs became terminal in this call: checked for completion once their
-- counters are written.
local FINISHING = {}

-- Stream entries the call is done with, per stream: acknowledged and deleted with one XACK
-- and one XDEL per stream when the script returns.
local DONE_ENTRIES = {}
local function ack(stream, entry)
  local entries = DONE_ENTRIES[stream]
  if not entries then
    entries = {}
    DONE_ENTRIES[stream] = entries
  end
  entries[#entries + 1] = entry
end

-- Writes the call's counters, completes the batches that finished, and acknowledges and
-- deletes the entries it is done with. Run after every script body.
local function flush()
  for key, fields in pairs(COUNTS) do
    for field, n in pairs(fields) do
      if n ~= 0 then redis.call('HINCRBY', key, field, n) end
    end
  end
  COUNTS = {}
  for batch in pairs(FINISHING) do
    check_batch_guard(batch)
    check_batch_done(batch)
  end
  FINISHING = {}
  for stream, entries in pairs(DONE_ENTRIES) do
    redis.call('XACK', stream, GROUP, unpack(entries))
    redis.call('XDEL', stream, unpack(entries))
  end
  DONE_ENTRIES = {}
end

-- Keeps a batch's per-state counters when one of its jobs moves from `old` to `new_state`.
local function count_transition(batch, old, new_state)
  if old == new_state or not batch then return end
  local bk = K.batch(batch)
  if old then count(bk, 'n:' .. old, -1) end
  count(bk, 'n:' .. new_state, 1)
  local was_terminal = old and TERMINAL[old]
  if TERMINAL[new_state] and not was_terminal then
    count(bk, 'terminal', 1)
    FINISHING[batch] = true
  elseif was_terminal and not TERMINAL[new_state] then
    count(bk, 'terminal', -1)
    redis.call('HSET', bk, 'done', 0)
    redis.call('PERSIST', bk)
    redis.call('PERSIST', K.batch_jobs(batch))
  end
end

-- The job fields the state-changing helpers use, read by load_job with one HMGET. A field
-- cleared by writing '' (so that clearing costs no HDEL) reads as false, like an absent one.
local JOB_FIELDS = { 'state', 'q', 'batch', 'prio', 'entry', 'worker', 'parked', 'wake',
  'attempts', 'charged_micros', 'trace', 'bstate', 'tenant', 'submitted_ms' }

-- A job as a table of JOB_FIELDS (plus `extra` fields), `id` and `key`; nil when missing.
local function load_job(id, extra)
  local key = K.job(id)
  local v
  if extra then
    v = redis.call('HMGET', key, 'state', 'q', 'batch', 'prio', 'entry', 'worker', 'parked',
      'wake', 'attempts', 'charged_micros', 'trace', 'bstate', 'tenant', 'submitted_ms',
      unpack(extra))
  else
    v = redis.call('HMGET', key, unpack(JOB_FIELDS))
  end
  if not v[1] then return nil end
  for i = 1, #v do
    if v[i] == '' then v[i] = false end
  end
  -- One constructor: the table is built at its size, not grown field by field.
  local job = { id = id, key = key, state = v[1], q = v[2], batch = v[3], prio = v[4],
    entry = v[5], worker = v[6], parked = v[7], wake = v[8], attempts = v[9],
    charged_micros = v[10], trace = v[11], bstate = v[12], tenant = v[13] or 'default',
    submitted_ms = v[14] }
  if extra then
    for i, name in ipairs(extra) do job[name] = v[14 + i] end
  end
  return job
end

-- Moves a job to a state, writing `fields` with it in one HSET. A batch's counters follow
-- its jobs from one delivery to the next: every change but a running job's own steps
-- (`step`: checkpoint.lua) moves the job in its batch's counts, from the state it was last
-- counted in (`bstate`) to this one. Steps within a delivery (submitting, downloading, …)
-- show on the job at once and in its batch's counts when the delivery ends.
local function set_state(job, new_state, fields, step)
  fields = fields or {}
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = new_state
  fields[#fields + 1] = 'updated_ms'
  fields[#fields + 1] = now()
  if job.batch and not step then
    count_transition(job.batch, job.bstate or job.state, new_state)
    fields[#fields + 1] = 'bstate'
    fields[#fields + 1] = new_state
    job.bstate = new_state
  end
  redis.call('HSET', job.key, unpack(fields))
  job.state = new_state
end

-- What each change clears (clearing).
local CLEAR_READY = { 'run_at_ms', 'worker', 'parked', 'wake' }
local CLEAR_PARKED = { 'parked' }
local CLEAR_FINISHED = { 'entry', 'worker', 'run_at_ms', 'wake', 'submitted_ms' }
local CLEAR_WAITING = { 'entry', 'worker', 'wake' }

-- Appends `name ''` to `fields` for each of `names` the job has: cleared in the same HSET.
local function clearing(job, fields, names)
  for _, name in ipairs(names) do
    if job[name] then
      fields[#fields + 1] = name
      fields[#fields + 1] = ''
      job[name] = false
    end
  end
  return fields
end

-- Puts a job on its ready stream and records the entry. A parked job (settle.lua's `park`)
-- leaves the parked count and keeps its state (a generation stays `generating`: it is only
-- due for its next poll), as does one made ready with `keep`. `fields`: more to write.
local function make_ready(job, reason, keep, fields)
  local entry = redis.call('XADD', K.ready(job.q, job.prio or 'normal'), '*', 'id', job.id)
  local state = 'queued'
  if (keep or job.parked) and job.state then state = job.state end
  if job.parked then count(K.stats(job.q), 'parked', -1) end
  fields = clearing(job, fields or {}, CLEAR_READY)
  fields[#fields + 1] = 'entry'
  fields[#fields + 1] = entry
  fields[#fields + 1] = 'reason'
  fields[#fields + 1] = reason or ''
  job.entry = entry
  set_state(job, state, fields)
  return entry
end

-- Takes a parked job out of the parked count (it is cancelled where it waits).
local function unpark(job, fields)
  if job.parked then count(K.stats(job.q), 'parked', -1) end
  return clearing(job, fields, CLEAR_PARKED)
end

-- The UTC day of `ms` as YYYYMMDD (the civil-from-days algorithm of H. Hinnant).
local function day_stamp(ms)
  local z = math.floor(ms / 86400000) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d%02d%02d', y, m, d)
end

-- Ends a job: terminal state, error, charge, dead-letter index, event, retention.
-- `ev`: {id, type, body} of its event (body '' for none).
local function finish(job, state, reason, err, ev, charged, fields)
  local submitted = tonumber(job.submitted_ms)
  fields = clearing(job, fields or {}, CLEAR_FINISHED)
  fields[#fields + 1] = 'finished_ms'
  fields[#fields + 1] = now()
  fields[#fields + 1] = 'reason'
  fields[#fields + 1] = reason
  if err ~= '' then
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = err
  end
  -- Per-queue counters, for metrics from any process.
  local stats = K.stats(job.q)
  if charged > 0 then
    fields[#fields + 1] = 'charged_micros'
    fields[#fields + 1] = (tonumber(job.charged_micros) or 0) + charged
    if job.batch then count(K.batch(job.batch), 'charged_micros', charged) end
    count(stats, 'charged_micros', charged)
    local ck = K.tenant_charged(day_stamp(now()))
    count(ck, job.tenant, charged)
    redis.call('EXPIRE', ck, 3 * 86400, 'NX')
  end
  if state == 'dead' then redis.call('ZADD', K.dead(job.q), now(), job.id) end
  if submitted then
    -- How long the runs take from their create to their end, per batch and per tenant (the
    -- batch ETA's run times).
    if job.batch then
      count(K.batch(job.batch), 'run_ms', now() - submitted)
      count(K.batch(job.batch), 'runs', 1)
    end
    count(stats, 't:' .. job.tenant .. ':run_ms', now() - submitted)
    count(stats, 't:' .. job.tenant .. ':runs', 1)
  end
  count(stats, 'finished:' .. state, 1)
  count(stats, 't:' .. job.tenant .. ':finished:' .. state, 1)
  if ev.body ~= '' then append_event(ev.id, ev.type, job.id, ev.body, job.trace) end
  set_state(job, state, fields)
  redis.call('EXPIRE', job.key, RETENTION)
end

-- The lease check of a delivery: 'ok' when `entry` is the job's current entry and
-- `consumer` started it, 'gone' when the entry is stale (settled, cancelled, re-queued),
-- 'lost' when another consumer took the job over. The start script records the consumer,
-- so a job reclaimed by another worker is theirs from the moment they start it.
local function holds(job, entry, consumer)
  if not job or TERMINAL[job.state] or job.entry ~= entry then return 'gone' end
  if job.worker ~= consumer then return 'lost' end
  return 'ok'
end

-- The owner of a pending stream entry, for lease renewal (the pending list is what
-- XAUTOCLAIM reads).
local function owner_of(stream, entry)
  local p = redis.call('XPENDING', stream, GROUP, entry, entry, 1)
  if #p == 0 then return nil end
  return p[1][2]
end

-- Fair share of a shared limit by dollars started (start-time fair queueing over tenants).
-- A tenant's virtual time (`vt:<t>` in K.limit_fair) is the micro-dollars it started divided
-- by its weight. A free slot goes to the first waiter (priority, then age) of the tenant with
-- the lowest virtual time among the tenants that wait and are below their own
-- max_concurrency. A tenant that starts waiting starts at max(its own virtual time, the
-- virtual start of the last run started, `v`): a tenant with nothing waiting banks no share.
-- Reads the lowest tenants, never the waiting jobs.
local FAIR = {}

-- Removes a holder of the limit; true when it held a slot.
function FAIR.drop(name, holder)
  if redis.call('ZREM', K.limit(name), holder) == 0 then return false end
  local hk = K.limit_held(name)
  local info = redis.call('HGET', hk, holder)
  if info then
    local field = 'inflight:' .. string.match(info, '^(%S+)')
    if redis.call('HINCRBY', K.limit_fair(name), field, -1) <= 0 then
      redis.call('HDEL', K.limit_fair(name), field)
    end
    redis.call('HDEL', hk, holder)
  end
  return true
end

-- Drops the holders whose lease lapsed (their worker stopped renewing).
function FAIR.expire(name)
  for _, holder in ipairs(redis.call('ZRANGEBYSCORE', K.limit(name), '-inf', now())) do
    FAIR.drop(name, holder)
  end
end

-- The live cap: `max`, lowered by throttling (slot_throttle.lua), regaining one slot per
-- recovery period.
function FAIR.cap(name, max)
  local ck = K.limit_cap(name)
  local c = redis.call('HMGET', ck, 'cap', 'recover_at', 'period')
  local cap = tonumber(c[1]) or max
  if cap > max then cap = max end
  if cap < max and c[2] and now() >= tonumber(c[2]) then
    cap = cap + 1
    redis.call('HSET', ck, 'cap', cap, 'recover_at', now() + tonumber(c[3] or 30000))
  end
  return cap
end

-- Gives `holder` (of `tenant`, costing `micros`) a slot and, unless `again` (a run that
-- exists takes back a slot that lapsed), charges its tenant's virtual time.
function FAIR.take(name, holder, tenant, micros, lease, again)
  local fk = K.limit_fair(name)
  redis.call('ZADD', K.limit(name), now() + lease, holder)
  redis.call('HSET', K.limit_held(name), holder, tenant .. ' ' .. micros)
  if again then
    redis.call('HINCRBY', fk, 'inflight:' .. tenant, 1)
    return
  end
  local f = redis.call('HMGET', fk, 'vt:' .. tenant, 'v', 'policy:' .. tenant)
  local weight = tonumber(string.match(f[3] or '', '^(%S+)')) or 1
  if weight <= 0 then weight = 1 end
  local start = math.max(tonumber(f[1]) or 0, tonumber(f[2]) or 0)
  local vt = math.floor(start + micros / weight)
  redis.call('HSET', fk, 'vt:' .. tenant, vt, 'v', start)
  redis.call('HINCRBY', fk, 'inflight:' .. tenant, 1)
  redis.call('HINCRBY', fk, 'started:' .. tenant, micros)
  redis.call('ZADD', K.limit_tenants(name), 'XX', vt, tenant)
end

-- Puts `holder` among its tenant's waiters (keeping its place if it waits already).
function FAIR.join(name, holder, tenant, micros, rank)
  redis.call('ZADD', K.limit_waiting(name, tenant), 'NX', rank * 1e13 + now(), holder)
  redis.call('HSET', K.limit_held(name), holder, tenant .. ' ' .. micros)
  local tk = K.limit_tenants(name)
  if not redis.call('ZSCORE', tk, tenant) then
    local fk = K.limit_fair(name)
    local f = redis.call('HMGET', fk, 'vt:' .. tenant, 'v')
    local vt = math.max(tonumber(f[1]) or 0, tonumber(f[2]) or 0)
    redis.call('HSET', fk, 'vt:' .. tenant, vt)
    redis.call('ZADD', tk, vt, tenant)
  end
end

-- Whether `tenant` is below its own max_concurrency (policy `weight cap`; 0: none).
function FAIR.below_own_cap(name, tenant)
  local f = redis.call('HMGET', K.limit_fair(name), 'policy:' .. tenant, 'inflight:' .. tenant)
  local own = tonumber(string.match(f[1] or '', '%S+%s+(%S+)')) or 0
  return own == 0 or (tonumber(f[2]) or 0) < own
end

-- Hands free slots to waiters in fair order; returns the holders it gave slots to.
function FAIR.grant(name, cap, lease)
  local granted = {}
  local tk = K.limit_tenants(name)
  local in_use = redis.call('ZCARD', K.limit(name))
  while in_use < cap do
    local picked = nil
    for _, tenant in ipairs(redis.call('ZRANGE', tk, 0, 99)) do
      if FAIR.below_own_cap(name, tenant) then
        picked = tenant
        break
      end
    end
    if not picked then break end
    local wk = K.limit_waiting(name, picked)
    local first = redis.call('ZPOPMIN', wk)
    if redis.call('ZCARD', wk) == 0 then redis.call('ZREM', tk, picked) end
    local holder = first[1]
    if holder then
      local info = redis.call('HGET', K.limit_held(name), holder) or ''
      local micros = tonumber(string.match(info, '%S+%s+(%S+)')) or 0
      FAIR.take(name, holder, picked, micros, lease)
      granted[#granted + 1] = holder
      in_use = in_use + 1
    end
  end
  return granted
end
