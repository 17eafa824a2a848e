-- heartbeat: record that consumers are alive, stamped with the Redis clock
-- (one clock for every host, so skew between workers cannot fake a death).
-- KEYS[1]=heartbeats zset KEYS[2]=workers hash   ARGV = name, info json, name, info json, ...
-- Returns the Redis time in ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return now
