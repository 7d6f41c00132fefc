-- Puts entries this consumer holds but never ran back on their streams, taking back the
-- attempt the start script counted (shutdown). ARGV: consumer, then (stream, entry, id) triples. Returns how many.
local consumer = ARGV[4]
local n = 0
for i = 5, #ARGV, 3 do
  local stream, entry, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if owner_of(stream, entry) == consumer then
    redis.call('XACK', stream, GROUP, entry)
    redis.call('XDEL', stream, entry)
    local jk = jobkey(id)
    local state = redis.call('HGET', jk, 'state')
    if state and not TERMINAL[state] then
      redis.call('HINCRBY', jk, 'attempts', -1)
      make_ready(jk, id, 'released by a stopping worker')
      n = n + 1
    end
  end
end
return n
