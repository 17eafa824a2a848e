-- complete: settle a batch of fetched entries of ONE queue, each gated on XACK.
-- An entry already acked (by a reaper hand-back or an earlier try of this very
-- batch) is skipped, so replaying a batch after a lost reply changes nothing.
-- KEYS[1]=stream KEYS[2]=delayed KEYS[3]=state KEYS[4]=dlq KEYS[5]=conf KEYS[6]=full
-- KEYS[7]=done counter KEYS[8]=cancel set KEYS[9]=waiters set KEYS[10]=progress hash
-- A job's result key, {p:q}:r:<job id>, is derived from KEYS[1]'s hash tag (the same
-- slot), so a batch carries no key per job.
-- ARGV[1]=group ARGV[2]=result ttl ms ARGV[3]=n ARGV[4]=done channel
-- ARGV[5]=the n entries, packed (jobqd.settle.pack_entries): per entry a header
--   (struct '>c1I2I2I4I4': op, then the byte lengths of the four fields) and the
--   fields: entry id, job id, payload, extra. One argument instead of five per entry:
--   the client packs a batch in one join, not a protocol frame per field.
--   op 'S' succeeded:   payload = final record json ('' = keep none: no record)
--   op 'R' retry/defer: payload = job json for the next attempt, extra = delay ms
--   op 'D' dead:        payload = job json (or raw fields json), extra = death json
--   op 'B' hand back:   payload = job json to re-add at the tail now
--   op 'C' cancelled:   payload = job json, extra = attempts made ('' = the job's own)
-- A job in the cancel set whose op is R or B (a retry, a drain's hand-back) is
-- cancelled instead: a cancel is never undone by a retry. S and D stand (it ended).
-- The settled entries are deleted from the stream, and the finished jobs' state and
-- progress fields removed, in one command each after the loop.
-- Returns a string of per-entry flags: '1' settled, 'c' settled as cancelled instead,
-- '0' skipped (not pending).
local group = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local chan = ARGV[4]
local tag = string.sub(KEYS[1], 1, -2)  -- '{p:q}:'
local cancels = redis.call('EXISTS', KEYS[8]) == 1
local waiters = redis.call('EXISTS', KEYS[9]) == 1
local progress = redis.call('EXISTS', KEYS[10]) == 1
local flags = {}
local now = nil
local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
local packed = ARGV[5]
local pos = 1
local acked = {}  -- entry ids to XDEL
local ended = {}  -- job ids whose state (and progress) field goes
for i = 1, n do
  local op, le, li, lp, lx = struct.unpack('>c1I2I2I4I4', packed, pos)
  pos = pos + 13
  local eid = string.sub(packed, pos, pos + le - 1)
  pos = pos + le
  local id = string.sub(packed, pos, pos + li - 1)
  pos = pos + li
  local payload = string.sub(packed, pos, pos + lp - 1)
  pos = pos + lp
  local extra = string.sub(packed, pos, pos + lx - 1)
  pos = pos + lx
  if redis.call('XACK', KEYS[1], group, eid) == 0 then
    flags[i] = '0'
  else
    acked[#acked + 1] = eid
    local flag = '1'
    if cancels and id ~= '' and redis.call('SREM', KEYS[8], id) == 1
        and (op == 'R' or op == 'B') then
      op = 'C'
      flag = 'c'
    end
    local final = nil
    if op == 'S' then
      if id ~= '' then
        ended[#ended + 1] = id
        if payload ~= '' then
          redis.call('SET', tag .. 'r:' .. id, payload, 'PX', ttl)
        end
        final = 'succeeded'
      end
    elseif op == 'C' then
      ended[#ended + 1] = id
      redis.call('ZREM', KEYS[2], id)
      local attempts = ''
      if extra ~= '' and tonumber(extra) then attempts = ',"attempts":' .. tonumber(extra) end
      redis.call('SET', tag .. 'r:' .. id, '{"status":"cancelled","finished":' .. clock() ..
                 attempts .. ',"job":' .. payload .. '}', 'PX', ttl)
      final = 'cancelled'
    elseif op == 'R' then
      redis.call('ZADD', KEYS[2], clock() + tonumber(extra), id)
      redis.call('HSET', KEYS[3], id, 'd' .. payload)
    elseif op == 'D' then
      local did = redis.call('XADD', KEYS[4], '*', 'j', payload, 'e', extra)
      if id ~= '' then
        redis.call('HSET', KEYS[3], id, 'x' .. did)
        final = 'dead'
      end
    elseif op == 'B' then
      local neid = redis.call('XADD', KEYS[1], '*', 'j', payload)
      redis.call('HSET', KEYS[3], id, neid)
    end
    if progress and id ~= '' and op ~= 'S' and op ~= 'C' then
      redis.call('HDEL', KEYS[10], id)
    end
    if final and waiters and redis.call('SREM', KEYS[9], id) == 1 then
      redis.call('PUBLISH', chan, id .. ' ' .. final)
    end
    flags[i] = flag
  end
end
if #acked > 0 then
  redis.call('XDEL', KEYS[1], unpack(acked))
  redis.call('INCRBY', KEYS[7], #acked)
end
if #ended > 0 then
  redis.call('HDEL', KEYS[3], unpack(ended))
  if progress then
    redis.call('HDEL', KEYS[10], unpack(ended))
  end
end
-- leave backpressure as soon as depth falls to the low watermark
if redis.call('EXISTS', KEYS[6]) == 1 then
  local low = tonumber(redis.call('HGET', KEYS[5], 'low') or '0')
  if redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) <= low then
    redis.call('DEL', KEYS[6])
  end
end
return table.concat(flags)
