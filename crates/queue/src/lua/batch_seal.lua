-- Seals a batch: no more jobs join it, and it is done once they are all terminal.
-- A: batch (id). Returns the batch's total.
local bk = K.batch(A.batch)
if redis.call('EXISTS', bk) == 0 then return -1 end
redis.call('HSET', bk, 'sealed', 1)
check_batch_done(A.batch)
return tonumber(redis.call('HGET', bk, 'total'))
