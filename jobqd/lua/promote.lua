-- promote: move due delayed jobs (delay_s and retries) into the stream, atomically:
-- a job is never in both the delayed set and the stream, nor in neither.
-- KEYS[1]=stream KEYS[2]=delayed KEYS[3]=state   ARGV[1]=max jobs to move
-- Returns {moved, ms until the next due job (-1: none)}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local v = redis.call('HGET', KEYS[3], id)
  if v and string.sub(v, 1, 1) == 'd' then
    local eid = redis.call('XADD', KEYS[1], '*', 'j', string.sub(v, 2))
    redis.call('HSET', KEYS[3], id, eid)
    moved = moved + 1
  end
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then
  wait = math.max(0, tonumber(nxt[2]) - now)
end
return {moved, wait}
