-- Cancels a job that is not terminal, wherever it is (ready, delayed or held by a worker,
-- whose next checkpoint then sees 'cancelled'). ARGV: id, reason, error JSON, event id,
-- event type, event JSON. Returns {outcome, previous state}.
local id, reason, err = ARGV[4], ARGV[5], ARGV[6]
local event_id, event_type, event = ARGV[7], ARGV[8], ARGV[9]
local jk = jobkey(id)
local f = redis.call('HMGET', jk, 'state', 'q', 'entry', 'prio', 'batch')
if not f[1] then return { 'missing', '' } end
if TERMINAL[f[1]] then return { 'terminal', f[1] } end
if f[3] then
  local stream = readykey(f[2], f[4])
  redis.call('XACK', stream, GROUP, f[3])
  redis.call('XDEL', stream, f[3])
end
redis.call('ZREM', P .. ':q:' .. f[2] .. ':delayed', id)
unpark(jk, f[2])
finish(jk, id, { state = f[1], q = f[2], batch = f[5] }, 'cancelled', reason, err, event_id,
  event_type, event, 0)
return { 'cancelled', f[1] }
