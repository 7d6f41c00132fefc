-- Gives a slot of a shared limit back, unless the holder took it again since the release was
-- asked for, and hands it on: the first waiter (slot_acquire.lua) leaves the waiters and is
-- returned, for the caller to wake. A: name, holder, fence (ms since the epoch; 0: release
-- unconditionally). A slot whose expiry lies past the fence was taken or renewed after the
-- release was asked for (a later attempt of the same job), so a release retried after an
-- outage leaves it be. Returns {1 when a slot was removed, waiter or ''}.
local zk = K.limit(A.name)
local fence = tonumber(A.fence)
if fence > 0 then
  local expiry = redis.call('ZSCORE', zk, A.holder)
  if not expiry or tonumber(expiry) > fence then return { 0, '' } end
end
if redis.call('ZREM', zk, A.holder) == 0 then return { 0, '' } end
local first = redis.call('ZPOPMIN', K.limit_waiters(A.name))
return { 1, first[1] or '' }
