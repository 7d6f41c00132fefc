-- Settles a delivery after its handler: finish, retry or defer (via the delayed set), or
-- release (back to ready). Only the consumer holding the entry may settle it.
-- ARGV: stream, entry, consumer, id, action, state, delay_ms, reason, error JSON,
-- event id, event type, event JSON, charged micros.
-- Returns 'ok', 'gone' (already settled or cancelled), 'lost' (another consumer holds it).
local stream, entry, consumer, id, action = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local state, delay, reason, err = ARGV[9], tonumber(ARGV[10]), ARGV[11], ARGV[12]
local event_id, event_type, event, charged = ARGV[13], ARGV[14], ARGV[15], tonumber(ARGV[16])
local owner = owner_of(stream, entry)
if not owner then return 'gone' end
if owner ~= consumer then return 'lost' end
redis.call('XACK', stream, GROUP, entry)
redis.call('XDEL', stream, entry)
local jk = jobkey(id)
if redis.call('EXISTS', jk) == 0 then return 'gone' end
local current = redis.call('HGET', jk, 'state')
if TERMINAL[current] then return 'gone' end
redis.call('HDEL', jk, 'entry', 'worker')
if action == 'finish' then
  finish(jk, id, state, reason, err, event_id, event_type, event, charged)
elseif action == 'retry' or action == 'defer' then
  if action == 'defer' then redis.call('HINCRBY', jk, 'attempts', -1) end
  if err ~= '' then redis.call('HSET', jk, 'error', err) end
  local queue = redis.call('HGET', jk, 'q')
  redis.call('ZADD', P .. ':q:' .. queue .. ':delayed', NOW + delay, id)
  redis.call('HSET', jk, 'run_at_ms', NOW + delay, 'reason', reason)
  set_state(jk, 'scheduled')
elseif action == 'release' then
  redis.call('HINCRBY', jk, 'attempts', -1)
  redis.call('HSET', jk, 'reason', reason)
  make_ready(jk, id)
end
return 'ok'
