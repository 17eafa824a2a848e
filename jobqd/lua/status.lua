-- status: everything known about one job, in one round trip (read only).
-- KEYS[1]=state KEYS[2]=stream KEYS[3]=delayed KEYS[4]=dlq KEYS[5]=result key
-- KEYS[6]=progress hash KEYS[7]=cancel set
-- ARGV[1]=job id ARGV[2]=group
-- Returns {'R', record} finished | {'D', job json, due ms} scheduled
--       | {'X', dlq entry id, fields} dead
--       | {'Q', entry id, fields, pending, progress json or '', cancel requested 0/1}
--         queued/running
--       | {'N'} unknown
local rec = redis.call('GET', KEYS[5])
if rec then
  return {'R', rec}
end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return {'N'}
end
local c = string.sub(v, 1, 1)
if c == 'd' then
  return {'D', string.sub(v, 2), redis.call('ZSCORE', KEYS[3], ARGV[1]) or ''}
end
if c == 'x' then
  local did = string.sub(v, 2)
  local e = redis.call('XRANGE', KEYS[4], did, did)
  if #e == 0 then
    return {'N'}
  end
  return {'X', did, e[1][2]}
end
local e = redis.call('XRANGE', KEYS[2], v, v)
if #e == 0 then
  return {'N'}
end
local p = redis.call('XPENDING', KEYS[2], ARGV[2], v, v, 1)
local owner = {}
if #p > 0 then
  owner = {p[1][2], p[1][3], p[1][4]}
end
return {'Q', v, e[1][2], owner, redis.call('HGET', KEYS[6], ARGV[1]) or '',
        redis.call('SISMEMBER', KEYS[7], ARGV[1])}
