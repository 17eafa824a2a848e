-- dlq_replay: move one dead-letter entry back into its queue as a fresh job.
-- KEYS[1]=dlq KEYS[2]=stream KEYS[3]=state KEYS[4]=result key
-- ARGV[1]=dlq entry id ARGV[2]=job id ARGV[3]=job json (attempts reset by the caller)
-- Returns the new stream entry id, or false when the dlq entry is gone.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return false
end
redis.call('XDEL', KEYS[1], ARGV[1])
local eid = redis.call('XADD', KEYS[2], '*', 'j', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], eid)
redis.call('DEL', KEYS[4])
return eid
