-- limit_acquire: may this job of ONE task start now? Concurrency and rate limit,
-- checked atomically; a token is only spent when a slot is free, and a slot only
-- taken when a token is there too. Times come from the Redis clock (TIME).
-- KEYS[1]=running zset (job id -> lease expiry ms)
-- KEYS[2]=bucket hash (t tokens, ts last refill us, q next suggested retry ms)
-- KEYS[3]=waiting zset (job id -> when it was told to retry, ms): the jobs refused for
--   concurrency that are expected back
-- ARGV[1]=job id  ARGV[2]=concurrency (0: none)  ARGV[3]=lease ms
-- ARGV[4]=rate count (0: none)  ARGV[5]=rate period ms
-- ARGV[6]=slot re-checks per second to aim for, over all waiting jobs of the task
-- ARGV[7]=jitter, uniform in [0, 1)  ARGV[8], ARGV[9]=least retry-after range ms
-- ARGV[10]=longest retry-after ms  ARGV[11]=grace ms: a waiting job this late is forgotten
-- Returns {1, 0, 0} granted | {0, 1, wait ms} concurrency full | {0, 2, wait ms} no token
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local id = ARGV[1]
local conc = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local count = tonumber(ARGV[4])

if conc > 0 then
  -- slots of holders that stopped renewing (a crashed daemon) are freed here
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  -- the same job again (redelivered after its holder died) reuses its slot
  if not redis.call('ZSCORE', KEYS[1], id) and redis.call('ZCARD', KEYS[1]) >= conc then
    -- Retry-after: spread the waiting jobs' re-checks so that, together, they come
    -- about ARGV[6] times a second (a freed slot is soon found, and a backlog of any
    -- size costs the same), but never sooner than the least retry-after.
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[11]))
    local waiting = redis.call('ZCARD', KEYS[3])
    local u = tonumber(ARGV[7])
    local lo, hi = tonumber(ARGV[8]), tonumber(ARGV[9])
    local wait = math.max(lo + u * (hi - lo), waiting / tonumber(ARGV[6]) * 1000 * (0.5 + u))
    wait = math.floor(math.min(wait, tonumber(ARGV[10])))
    redis.call('ZADD', KEYS[3], now + wait, id)
    local ttl = wait + tonumber(ARGV[11])
    if redis.call('PTTL', KEYS[3]) < ttl then
      redis.call('PEXPIRE', KEYS[3], ttl)
    end
    return {0, 1, wait}
  end
end

if count > 0 then
  local period = tonumber(ARGV[5])
  local per_us = count / (period * 1000)  -- tokens per microsecond
  local b = redis.call('HMGET', KEYS[2], 't', 'ts', 'q')
  local tokens = count
  if b[1] and b[2] then
    tokens = math.min(count, tonumber(b[1]) + math.max(0, now_us - tonumber(b[2])) * per_us)
  end
  local q = tonumber(b[3] or '0')
  if tokens < 1 then
    -- no token: suggest a retry time. Successive refused jobs get successive token
    -- times (q), so N waiters come back one per token, not all at the next one.
    local at = math.max(now + math.ceil((1 - tokens) / per_us / 1000), q)
    local step = period / count
    redis.call('HSET', KEYS[2], 't', string.format('%.17g', tokens), 'ts',
               string.format('%d', now_us), 'q', string.format('%d', math.ceil(at + step)))
    redis.call('PEXPIRE', KEYS[2], math.ceil(period + (at + step - now)) + 1000)
    return {0, 2, math.max(1, at - now)}
  end
  redis.call('HSET', KEYS[2], 't', string.format('%.17g', tokens - 1), 'ts',
             string.format('%d', now_us))
  -- a full refill takes one period: after that the missing key means a full bucket
  redis.call('PEXPIRE', KEYS[2], math.ceil(period + math.max(0, q - now)) + 1000)
end

if conc > 0 then
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], now + lease, id)
  if redis.call('PTTL', KEYS[1]) < lease then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
end
return {1, 0, 0}
