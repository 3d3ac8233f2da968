-- ack: forget outbox records whose ledger rows are written, and keep the backlog registry
-- true: the outbox leaves it once empty; otherwise its score becomes the time its oldest
-- remaining record has waited since (read from the records, when there are at most 1000 of
-- them: a larger outbox is a backlog anyway, and keeps the older score it has).
-- KEYS[1] outbox hash, KEYS[2] backlog registry (see _window.lua). ARGV[1] now ms override or
-- "", ARGV[2..] reservation ids. Returns the records left in the outbox.
local now = clock(ARGV[1])
for i = 2, #ARGV, 500 do
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
local left = redis.call('HLEN', KEYS[1])
if left == 0 then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 0
end
if left > 1000 then
  note_backlog(KEYS[2], KEYS[1], now)
  return left
end
-- When each record started waiting: settled at (settle.lua), moved at (expire.lua), or for an
-- expired record written before the registries, when it was reserved (earlier: never late).
local oldest = nil
for _, rec in ipairs(redis.call('HVALS', KEYS[1])) do
  local since = string.match(rec, '^s2?:%d+:%d+:%d+:(%d+):') or string.match(rec, '^e:(%d+):')
    or string.match(rec, '^v2:%-?%d+:%d+:(%d+):') or string.match(rec, '^%-?%d+:%d+:(%d+):')
  since = tonumber(since)
  if since and (not oldest or since < oldest) then oldest = since end
end
redis.call('ZADD', KEYS[2], oldest or now, KEYS[1])
return left
