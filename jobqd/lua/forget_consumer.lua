-- forget_consumer: delete a consumer from a group only if it owns no entry.
-- XGROUP DELCONSUMER drops the consumer's pending entries from the PEL while
-- they stay in the stream, below last-delivered-id: nobody would ever see them
-- again. Checked and deleted in one step, so nothing can be claimed in between.
-- KEYS[1]=stream   ARGV[1]=group ARGV[2]=consumer
-- Returns 1 when deleted, 0 when it still owns entries (or does not exist).
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
