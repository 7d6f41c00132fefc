-- Renews the leases this consumer holds. ARGV: consumer, then (stream, entry) pairs.
-- Returns the positions (0-based, in pair order) of the entries it no longer holds
-- (settled, cancelled or taken by another consumer).
local consumer = ARGV[4]
local lost = {}
for i = 5, #ARGV, 2 do
  local stream, entry = ARGV[i], ARGV[i + 1]
  local owner = owner_of(stream, entry)
  if owner == consumer then
    redis.call('XCLAIM', stream, GROUP, consumer, 0, entry, 'JUSTID')
  else
    lost[#lost + 1] = (i - 5) / 2
  end
end
return lost
