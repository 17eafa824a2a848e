-- dlq_remove: delete dead-letter entries and forget their jobs.
-- KEYS[1]=dlq KEYS[2]=state   ARGV = entry id, job id, entry id, job id, ...
-- Returns how many entries were deleted.
local removed = 0
for i = 1, #ARGV, 2 do
  removed = removed + redis.call('XDEL', KEYS[1], ARGV[i])
  if ARGV[i + 1] ~= '' and redis.call('HGET', KEYS[2], ARGV[i + 1]) == 'x' .. ARGV[i] then
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
  end
end
return removed
