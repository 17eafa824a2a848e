-- cancel: stop one job of ONE queue (read the state, then act, atomically).
-- KEYS[1]=state KEYS[2]=stream KEYS[3]=delayed KEYS[4]=result key KEYS[5]=cancel set
-- KEYS[6]=waiters set
-- ARGV[1]=job id ARGV[2]=group ARGV[3]=result ttl ms ARGV[4]=control channel
-- ARGV[5]=done channel
-- Returns {'CANCELLED', 'queued'|'scheduled'}: removed, it never runs
--       | {'CANCELLING'}: running (or fetched): flagged in the cancel set and announced
--         on the control channel; the daemon holding it stops it and settles it
--       | {'FINISHED', 'succeeded'|'dead'|'cancelled'} | {'N'} unknown
local id = ARGV[1]
local function finish(job)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[4], '{"status":"cancelled","finished":' .. now .. ',"job":' .. job .. '}',
             'PX', tonumber(ARGV[3]))
  redis.call('HDEL', KEYS[1], id)
  if redis.call('SREM', KEYS[6], id) == 1 then
    redis.call('PUBLISH', ARGV[5], id .. ' cancelled')
  end
end
local rec = redis.call('GET', KEYS[4])
if rec then
  local st = string.match(rec, '^{"status":"(%a+)"')
  return {'FINISHED', st or 'succeeded'}
end
local v = redis.call('HGET', KEYS[1], id)
if not v then
  return {'N'}
end
local c = string.sub(v, 1, 1)
if c == 'x' then
  return {'FINISHED', 'dead'}
end
if c == 'd' then
  redis.call('ZREM', KEYS[3], id)
  finish(string.sub(v, 2))
  return {'CANCELLED', 'scheduled'}
end
local e = redis.call('XRANGE', KEYS[2], v, v)
if #e == 0 then
  return {'N'}
end
if #redis.call('XPENDING', KEYS[2], ARGV[2], v, v, 1) == 0 then
  local job = nil
  local f = e[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'j' then job = f[i + 1] end
  end
  redis.call('XDEL', KEYS[2], v)
  finish(job or 'null')
  return {'CANCELLED', 'queued'}
end
redis.call('SADD', KEYS[5], id)
redis.call('PUBLISH', ARGV[4], 'cancel ' .. id)
return {'CANCELLING'}
