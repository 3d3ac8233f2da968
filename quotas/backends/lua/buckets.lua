-- buckets: one consistent read of a token window for the audit: its live buckets, pending
-- reservations and ledger outbox (buckets that left the window are dropped on the way).
-- KEYS and ARGV[1..5]: see _window.lua.
-- Returns {epoch ("" when the window was never built or was lost: nothing else is read),
--          now ms, first live bucket index, current bucket index,
--          {bucket index, tokens, ...} for every non-empty live bucket,
--          {id, record, ...} pending reservations, {id, record, ...} ledger outbox,
--          last reset ms (0: never)}
-- Records are as reserve.lua (pending), settle.lua and expire.lua (outbox) write them.
local now = clock(ARGV[1])
local window_ms, bucket_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then return {'', now, 0, 0, {}, {}, {}, 0} end
local w = open_window(KEYS[1], now, window_ms, bucket_ms)
local buckets = {}
for b = w.first, w.cur do
  local v = tonumber(redis.call('HGET', KEYS[1], slot(w.nb, b)))
  if v and v ~= 0 then
    buckets[#buckets + 1] = b
    buckets[#buckets + 1] = v
  end
end
return {epoch, now, w.first, w.cur, buckets, redis.call('HGETALL', KEYS[4]),
        redis.call('HGETALL', KEYS[5]), tonumber(redis.call('HGET', KEYS[1], 'rs')) or 0}
