-- heartbeat: record that consumers are alive, stamped with the Redis clock
-- (one clock for every host, so skew between workers cannot fake a death).
-- KEYS[1]=heartbeats zset   ARGV = consumer names
-- The workers hash (name -> info) is written next to it in the same pipeline, not
-- here: on a Redis Cluster the two global keys live on different slots.
-- Returns the Redis time in ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
return now
