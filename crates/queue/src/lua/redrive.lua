-- Re-drives a dead job: attempts reset, a new life (redrives + 1), back on its ready stream.
-- ARGV: id. Returns the job's state before ('dead' when it was re-driven) or '' if missing.
local id = ARGV[4]
local jk = jobkey(id)
local f = redis.call('HMGET', jk, 'state', 'q')
if not f[1] then return '' end
if f[1] ~= 'dead' then return f[1] end
redis.call('ZREM', P .. ':q:' .. f[2] .. ':dead', id)
redis.call('HSET', jk, 'attempts', 0)
redis.call('HINCRBY', jk, 'redrives', 1)
redis.call('HDEL', jk, 'error', 'finished_ms')
redis.call('PERSIST', jk)
make_ready(jk, id, 're-driven')
return 'dead'
