-- audit: set buckets of a token window to the figures the ledger gives, each one only if it
-- still holds the tokens the audit read (compare-and-set), and only in the epoch the audit
-- read. A bucket that changed since (a request charged or settled in between) is left alone
-- for the next audit. Setting absolute figures, not adding differences, makes a repeated or
-- re-delivered audit change nothing.
-- KEYS and ARGV[1..5]: see _window.lua.
-- ARGV[6] epoch read; ARGV[7..] triples: bucket index, tokens read, tokens to set (>= 0).
-- Returns {tokens added to the window (negative: removed), buckets changed}, or {0, -1} when
-- the window was rebuilt or lost since the read (nothing changed).
local now = clock(ARGV[1])
local window_ms, bucket_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[6] then return {0, -1} end
local w = open_window(KEYS[1], now, window_ms, bucket_ms)
local delta, changed = 0, 0
for i = 7, #ARGV, 3 do
  local b, seen, target = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local field = slot(w.nb, b)
  local current = tonumber(redis.call('HGET', KEYS[1], field)) or 0
  if b >= w.first and b <= w.cur and current == seen and target >= 0 then
    if target == 0 then
      redis.call('HDEL', KEYS[1], field)
    else
      redis.call('HSET', KEYS[1], field, target)
    end
    delta = delta + target - current
    changed = changed + 1
    if not w.newest or b > w.newest then w.newest = b end
    -- The expiry cursor must not start after a bucket that now holds tokens.
    local oldest = tonumber(redis.call('HGET', KEYS[1], 'o'))
    if not oldest or b < oldest then redis.call('HSET', KEYS[1], 'o', b) end
  end
end
if changed > 0 then
  w.total = math.max(w.total + delta, 0)
  redis.call('HSET', KEYS[1], 't', w.total, 'n', w.newest)
  redis.call('PEXPIRE', KEYS[1], w.ttl)
end
return {delta, changed}
