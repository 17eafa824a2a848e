-- enqueue: add a batch of jobs for ONE task to ONE queue, atomically.
-- KEYS[1]=stream KEYS[2]=delayed KEYS[3]=state KEYS[4]=conf KEYS[5]=full
-- KEYS[6]=enqueue counters ({p:q}:in) KEYS[7]=memory-full marker ({p:q}:mem, set with a
-- short PX by the daemons' redis guard while Redis memory is over
-- redis.max_memory_fraction) KEYS[7+k]=idempotency key k (k >= 1)
-- Also HINCRBYs the task's field of KEYS[6] by the
-- number of jobs created: every producer's enqueues, read by jobqd_jobs_enqueued_total.
-- ARGV[1]=task ARGV[2]=n ARGV[3]=idempotency ttl ms
-- then per job i (0-based), at b = 4 + 4*i: id, job json, delay ms, idempotency key index (0 = none)
-- Returns {'OK', flags, id...} (flag '1' = created, '0' = idempotent hit, id = the existing job)
--      or {'UNKNOWN'} | {'TOOBIG', i, size, max} | {'FULL', depth, high, low}
--      | {'MEMFULL', '<used> <max> <fraction>'}
local task = ARGV[1]
local n = tonumber(ARGV[2])
local idem_ttl = tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[4], 't:' .. task) == 0 then
  return {'UNKNOWN'}
end
local maxp = tonumber(redis.call('HGET', KEYS[4], 'maxp') or '0')
local fresh = 0
for i = 0, n - 1 do
  local b = 4 + 4 * i
  local size = string.len(ARGV[b + 1])
  if maxp > 0 and size > maxp then
    return {'TOOBIG', i, size, maxp}
  end
  local ki = tonumber(ARGV[b + 3])
  if ki == 0 or redis.call('EXISTS', KEYS[7 + ki]) == 0 then
    fresh = fresh + 1
  end
end
if fresh > 0 then
  local mem = redis.call('GET', KEYS[7])
  if mem then
    return {'MEMFULL', mem}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local high = tonumber(redis.call('HGET', KEYS[4], 'high') or '0')
if fresh > 0 and high > 0 then
  -- two-watermark band: refuse from depth >= high until depth <= low
  local low = tonumber(redis.call('HGET', KEYS[4], 'low') or '0')
  local depth = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  local full = redis.call('EXISTS', KEYS[5]) == 1
  if full and depth <= low then
    redis.call('DEL', KEYS[5])
    full = false
  end
  if (not full) and depth >= high then
    redis.call('SET', KEYS[5], now)
    full = true
  end
  if full then
    return {'FULL', depth, high, low}
  end
end
local out = {'OK', ''}
local flags = {}
for i = 0, n - 1 do
  local b = 4 + 4 * i
  local id = ARGV[b]
  local ki = tonumber(ARGV[b + 3])
  local hit = false
  if ki > 0 then
    hit = redis.call('GET', KEYS[7 + ki])
    if not hit then
      redis.call('SET', KEYS[7 + ki], id, 'PX', idem_ttl)
    end
  end
  if hit then
    out[#out + 1] = hit
    flags[#flags + 1] = '0'
  else
    local delay = tonumber(ARGV[b + 2])
    if delay > 0 then
      redis.call('ZADD', KEYS[2], now + delay, id)
      redis.call('HSET', KEYS[3], id, 'd' .. ARGV[b + 1])
    else
      local eid = redis.call('XADD', KEYS[1], '*', 'j', ARGV[b + 1])
      redis.call('HSET', KEYS[3], id, eid)
    end
    out[#out + 1] = id
    flags[#flags + 1] = '1'
  end
end
local created = 0
for i = 1, #flags do
  if flags[i] == '1' then
    created = created + 1
  end
end
if created > 0 then
  redis.call('HINCRBY', KEYS[6], task, created)
end
out[2] = table.concat(flags)
return out
