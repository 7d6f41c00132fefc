-- Re-drives a dead job, or a failed one (by id: a failure an operator fixed, such as a
-- download refused by the allow-list): attempts reset, a new life (redrives + 1), back on its
-- ready stream. The checkpoint stays, so a job whose paid run is kept downloads it again and
-- never pays twice. ARGV: id, queue. Returns 'redriven', the job's state when it was not
-- re-driven, or '' if missing or a job of another queue (a webhook delivery is not a video
-- job).
local id, queue = ARGV[4], ARGV[5]
local jk = jobkey(id)
local f = redis.call('HMGET', jk, 'state', 'q')
if not f[1] or f[2] ~= queue then return '' end
if f[1] ~= 'dead' and f[1] ~= 'failed' then return f[1] end
redis.call('ZREM', P .. ':q:' .. f[2] .. ':dead', id)
redis.call('HSET', jk, 'attempts', 0)
redis.call('HINCRBY', jk, 'redrives', 1)
redis.call('HDEL', jk, 'error', 'finished_ms')
redis.call('PERSIST', jk)
make_ready(jk, id, 're-driven')
return 'redriven'
