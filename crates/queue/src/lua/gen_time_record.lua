-- Counts one finished run in a generation-time histogram (partition 0). A: name (model and
-- clip duration), bucket (field), cap. Past `cap` samples every count is halved, so the
-- histogram follows the provider as it speeds up or slows down. Returns the number of
-- samples.
local hk = K.gen_times(A.name)
redis.call('HINCRBY', hk, A.bucket, 1)
local n = redis.call('HINCRBY', hk, 'n', 1)
if n > tonumber(A.cap) then
  local all = redis.call('HGETALL', hk)
  local total = 0
  for i = 1, #all, 2 do
    if all[i] ~= 'n' then
      local half = math.floor(tonumber(all[i + 1]) / 2)
      if half == 0 then
        redis.call('HDEL', hk, all[i])
      else
        redis.call('HSET', hk, all[i], half)
        total = total + half
      end
    end
  end
  redis.call('HSET', hk, 'n', total)
  n = total
end
return n
