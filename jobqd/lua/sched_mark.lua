-- sched_mark: move one schedule's "last tick handled" forward, never back.
-- KEYS[1]=<prefix>:sched (hash: schedule name -> "<tick ms> <info json>")
-- ARGV[1]=schedule name ARGV[2]=tick ms ARGV[3]=info json
-- ARGV[4]='1': only set when absent (a new schedule's baseline)
-- Returns 1 if written, 0 if the stored tick is already >= this one.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if ARGV[4] == '1' then
    return 0
  end
  local t = tonumber(string.match(cur, '^(%-?%d+)'))
  if t and t >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return 1
