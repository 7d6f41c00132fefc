-- The provider said "too many requests": lower the shared cap multiplicatively (at most once
-- per period), and start recovering one slot per period after that.
-- A: name, max (configured maximum), period_ms (recovery period). Returns the new cap.
local max, period = tonumber(A.max), tonumber(A.period_ms)
local ck = K.limit_cap(A.name)
local c = redis.call('HMGET', ck, 'cap', 'lowered_at')
local cap = tonumber(c[1]) or max
if c[2] and now() - tonumber(c[2]) < period then return cap end
local in_use = redis.call('ZCARD', K.limit(A.name))
local base = math.min(cap, math.max(in_use, 1))
cap = math.max(1, math.floor(base * 0.75))
redis.call('HSET', ck, 'cap', cap, 'lowered_at', now(), 'recover_at', now() + period, 'period', period)
return cap
