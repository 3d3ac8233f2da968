-- peek: the budget snapshot, charging nothing (expired buckets are dropped on the way).
-- KEYS and ARGV[1..5]: see _window.lua.
-- ARGV[6] config or "" (as in reserve.lua), ARGV[7] epoch to stamp if rebuilt,
-- ARGV[8..] seed pairs: bucket, tokens.
-- Returns {1, limit, used, reserved, remaining, reset ms, rpm limit, rpm used, plan slug,
--          max per request, concurrency limit, in flight} or {-1, window has epoch (1/0)}.
local now = clock(ARGV[1])
local window_ms, bucket_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg, w = load_cfg(open_window(KEYS[1], now, window_ms, bucket_ms), now, window_ms,
                        bucket_ms, ARGV[6], ARGV[7], 8)
if not cfg then return {-1, w.epoch and 1 or 0} end
local rpm_used = 0
if cfg.rpm > 0 then
  rpm_used = open_window(KEYS[2], now, tonumber(ARGV[4]), tonumber(ARGV[5])).total
end
local in_flight = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')
return {1, cfg.tokens, w.total, w.reserved, cfg.tokens - w.total, reset_ms(w, now), cfg.rpm,
        rpm_used, cfg.slug, cfg.cap, cfg.conc, in_flight}
