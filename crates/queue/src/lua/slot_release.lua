-- Gives a slot of a shared limit back, unless the holder took it again since the release was
-- asked for, and hands free slots on to waiters in fair order (prelude's FAIR), returning
-- them for the caller to wake. A: name, holder, fence (ms since the epoch; 0: release
-- unconditionally). A slot whose expiry lies past the fence was taken or renewed after the
-- release was asked for (a later attempt of the same job), so a release retried after an
-- outage leaves it be. Returns {1 when a slot was removed (else 0), holders given a slot...}.
local name = A.name
local zk = K.limit(name)
local fence = tonumber(A.fence)
if fence > 0 then
  local expiry = redis.call('ZSCORE', zk, A.holder)
  if not expiry or tonumber(expiry) > fence then return { 0 } end
end
FAIR.expire(name)
local removed = FAIR.drop(name, A.holder)
local f = redis.call('HMGET', K.limit_fair(name), 'max', 'lease')
if not f[1] then return { removed and 1 or 0 } end
local out = { removed and 1 or 0 }
for _, granted in ipairs(FAIR.grant(name, FAIR.cap(name, tonumber(f[1])), tonumber(f[2]))) do
  out[#out + 1] = granted
end
return out
