-- complete: settle a batch of fetched entries of ONE queue, each gated on XACK.
-- An entry already acked (by a reaper hand-back or an earlier try of this very
-- batch) is skipped, so replaying a batch after a lost reply changes nothing.
-- KEYS[1]=stream KEYS[2]=delayed KEYS[3]=state KEYS[4]=dlq KEYS[5]=conf KEYS[6]=full
-- KEYS[7]=done counter (attempts finished, for rates)  KEYS[7+k]=result key k (k >= 1)
-- ARGV[1]=group ARGV[2]=result ttl ms ARGV[3]=n
-- then per entry i (0-based), at b = 4 + 5*i: op, entry id, job id, payload, extra
--   op 'S' succeeded:   payload = final record json, extra = result key index
--   op 'R' retry/defer: payload = job json for the next attempt, extra = delay ms
--   op 'D' dead:        payload = job json (or raw fields json), extra = death json
--   op 'B' hand back:   payload = job json to re-add at the tail now
-- Returns a string of per-entry flags: '1' settled, '0' skipped (not pending).
local group = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local flags = {}
local now = nil
for i = 0, n - 1 do
  local b = 4 + 5 * i
  local op, eid, id, payload, extra = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  if redis.call('XACK', KEYS[1], group, eid) == 0 then
    flags[#flags + 1] = '0'
  else
    redis.call('XDEL', KEYS[1], eid)
    if op == 'S' then
      if id ~= '' then
        redis.call('HDEL', KEYS[3], id)
        redis.call('SET', KEYS[7 + tonumber(extra)], payload, 'PX', ttl)
      end
    elseif op == 'R' then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('ZADD', KEYS[2], now + tonumber(extra), id)
      redis.call('HSET', KEYS[3], id, 'd' .. payload)
    elseif op == 'D' then
      local did = redis.call('XADD', KEYS[4], '*', 'j', payload, 'e', extra)
      if id ~= '' then
        redis.call('HSET', KEYS[3], id, 'x' .. did)
      end
    elseif op == 'B' then
      local neid = redis.call('XADD', KEYS[1], '*', 'j', payload)
      redis.call('HSET', KEYS[3], id, neid)
    end
    flags[#flags + 1] = '1'
  end
end
local settled = 0
for _, f in ipairs(flags) do
  if f == '1' then settled = settled + 1 end
end
if settled > 0 then
  redis.call('INCRBY', KEYS[7], settled)
end
-- leave backpressure as soon as depth falls to the low watermark
if redis.call('EXISTS', KEYS[6]) == 1 then
  local low = tonumber(redis.call('HGET', KEYS[5], 'low') or '0')
  if redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) <= low then
    redis.call('DEL', KEYS[6])
  end
end
return table.concat(flags)
