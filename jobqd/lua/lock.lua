-- lock: take, renew or release a lease-style lock that a kill -9 cannot leave held.
-- KEYS[1]=lock   ARGV[1]=token ARGV[2]=ttl ms ARGV[3]='acquire'|'release'
-- Returns 1 when the caller holds (or released) the lock, 0 otherwise.
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if cur == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
