-- Renews the leases this consumer holds: resets each entry's idle time in the pending list,
-- which XAUTOCLAIM reads. A: consumer. ITEMS: stream, entry. Returns the positions (0-based,
-- in item order) of the entries it no longer holds (settled, cancelled or taken by another
-- consumer).
local lost = {}
for i, item in ipairs(ITEMS) do
  if owner_of(item.stream, item.entry) == A.consumer then
    redis.call('XCLAIM', item.stream, GROUP, A.consumer, 0, item.entry, 'JUSTID')
  else
    lost[#lost + 1] = i - 1
  end
end
return lost
