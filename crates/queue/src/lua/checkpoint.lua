-- Writes a running job's state and checkpoint, only while this consumer holds its lease;
-- renews the lease as it goes. ARGV: stream, entry, consumer, id, state, checkpoint JSON
-- ('' keeps it), reason. Returns 'ok', 'cancelled', 'lost' or 'gone'.
local stream, entry, consumer, id = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local state, checkpoint, reason = ARGV[8], ARGV[9], ARGV[10]
local jk = jobkey(id)
local f = redis.call('HMGET', jk, 'state', 'batch')
local current = f[1]
if not current then return 'gone' end
if current == 'cancelled' then return 'cancelled' end
if TERMINAL[current] then return 'gone' end
local owner = owner_of(stream, entry)
if not owner then return 'gone' end
if owner ~= consumer then return 'lost' end
redis.call('XCLAIM', stream, GROUP, consumer, 0, entry, 'JUSTID')
local fields = { 'reason', reason }
if checkpoint ~= '' then
  fields[#fields + 1] = 'checkpoint'
  fields[#fields + 1] = checkpoint
end
set_state(jk, state, fields, current, f[2])
return 'ok'
