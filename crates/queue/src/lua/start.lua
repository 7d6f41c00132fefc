-- Starts delivered entries: counts the attempt durably before any handler runs, and drops
-- entries whose job is gone, finished, or re-queued under a newer entry.
-- ARGV: consumer, then (stream, entry, job id) triples.
-- Returns per started entry: entry, id, attempts, max_attempts, payload, batch, redrives,
-- checkpoint, created_ms, state, prio, traceparent.
local consumer = ARGV[4]
local out = {}
for i = 5, #ARGV, 3 do
  local stream, entry, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local jk = jobkey(id)
  local f = redis.call('HMGET', jk, 'state', 'entry', 'max_attempts', 'payload', 'batch',
    'redrives', 'checkpoint', 'created_ms', 'prio', 'trace')
  if not f[1] or TERMINAL[f[1]] or f[2] ~= entry then
    redis.call('XACK', stream, GROUP, entry)
    redis.call('XDEL', stream, entry)
  else
    local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'worker', consumer, 'started_ms', NOW)
    local n = #out
    out[n + 1] = entry
    out[n + 2] = id
    out[n + 3] = attempts
    out[n + 4] = f[3]
    out[n + 5] = f[4]
    out[n + 6] = f[5] or ''
    out[n + 7] = f[6] or '0'
    out[n + 8] = f[7] or ''
    out[n + 9] = f[8] or '0'
    out[n + 10] = f[1]
    out[n + 11] = f[9] or 'normal'
    out[n + 12] = f[10] or ''
  end
end
return out
