-- limit_renew: extend the concurrency leases of one task's running jobs held by
-- one daemon (called every heartbeat). A lease that expired meanwhile (the daemon
-- stalled, or Redis lost the key) is taken again, so the set counts every job
-- that is really running even if that briefly exceeds the limit.
-- KEYS[1]=running zset   ARGV[1]=lease ms  ARGV[2..]=job ids
-- Returns how many leases had expired and were taken again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local retaken = 0
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) == 1 then
    retaken = retaken + 1
  end
end
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return retaken
