-- reserve: check and charge every limit that applies, all or nothing.
-- KEYS and ARGV[1..5]: see _window.lua. KEYS[7] the due registry (see _window.lua).
-- ARGV[6] reservation id, ARGV[7] tokens (integer >= 0), ARGV[8] reservation TTL ms,
-- ARGV[9] config (see _window.lua) or "" (use the stored one),
-- ARGV[10] epoch to stamp if the window is (re)built, ARGV[11] model name (kept with the
-- reservation for its ledger row), ARGV[12] "1": add the plan's default output allowance
-- to the tokens (the request named no max_tokens), ARGV[13] rejected attempts allowed per
-- request window (0: no such limit), ARGV[14..] seed pairs: bucket, tokens.
-- KEYS[6]: the rejected-attempts window (see attempt.lua). A client at its allowance is
-- refused (status 7) whatever it asks; a 413 (status 4 or 5) counts as one more attempt.
-- Returns {status, limit, remaining, reset ms, retry-after ms, reserved, rpm limit,
--          rpm remaining, epoch, plan slug, max per request, bucket index, now ms,
--          tokens requested, rpm reset ms, concurrency limit, requests in flight (before
--          this one; counted only when a concurrency limit applies)}
-- status: 1 allowed; 0 over tokens; 2 over requests per minute; 3 over concurrency;
--         4 over the per-request cap; 5 over the whole budget; 6 duplicate reservation id;
--         7 over the rejected-attempts allowance;
--         -1 no config stored: {-1, window has epoch (1/0)}. Rejections charge nothing.
local now = clock(ARGV[1])
local window_ms, bucket_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local rid, tokens, ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local cfg, w = load_cfg(open_window(KEYS[1], now, window_ms, bucket_ms), now, window_ms,
                        bucket_ms, ARGV[9], ARGV[10], 14)
if not cfg then return {-1, w.epoch and 1 or 0} end
if ARGV[12] == '1' then tokens = tokens + cfg.out end

local q = nil
local status, retry, rpm_remaining, in_flight = 1, 0, -1, 0
if cfg.rpm > 0 then
  q = open_window(KEYS[2], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
  rpm_remaining = cfg.rpm - q.total
end

local attempts_limit = tonumber(ARGV[13])
local a = nil
if attempts_limit > 0 then
  a = open_window(KEYS[6], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
end

if a and a.total >= attempts_limit then
  status = 7
  retry = wait_ms(a, 1, attempts_limit, now)
elseif cfg.cap > 0 and tokens > cfg.cap then
  status = 4
elseif tokens > cfg.tokens then
  status = 5
else
  if w.total + tokens > cfg.tokens then
    status = 0
    retry = wait_ms(w, tokens, cfg.tokens, now)
  end
  if q and q.total + 1 > cfg.rpm then
    if status == 1 then status = 2 end
    retry = math.max(retry, wait_ms(q, 1, cfg.rpm, now))
  end
  if cfg.conc > 0 then in_flight = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') end
  if cfg.conc > 0 and in_flight >= cfg.conc then
    if status == 1 then status = 3 end
    -- A slot frees when another request finishes, which no clock can tell: a short hint.
    retry = math.max(retry, 1000)
  end
end

if a and (status == 4 or status == 5) then charge(a, 1) end

local reserved = w.reserved
local record = w.cur .. ':' .. tokens .. ':' .. now .. ':' .. ARGV[11]
if status == 1 and redis.call('HSETNX', KEYS[4], rid, record) == 0 then
  status = 6  -- the id is taken: charge nothing
end
if status == 1 then
  reserved = reserved + tokens
  local first_in_bucket = charge(w, tokens, {'rv', reserved})
  if q then
    charge(q, 1)
    rpm_remaining = rpm_remaining - 1
  end
  redis.call('ZADD', KEYS[3], now + ttl, rid)
  -- LT: a later deadline leaves the key's earliest one in place (one write, no read).
  redis.call('ZADD', KEYS[7], 'LT', now + ttl, KEYS[3])
  -- Settles and expiry delete these keys when they empty, which leaves nothing reserved: with
  -- tokens still reserved they exist, and a refresh once per bucket keeps them alive longer
  -- than any reservation in them.
  if w.reserved == 0 or first_in_bucket then
    redis.call('PEXPIRE', KEYS[3], ttl + window_ms)
    redis.call('PEXPIRE', KEYS[4], ttl + window_ms)
    redis.call('PEXPIRE', KEYS[7], REGISTRY_TTL_MS)
  end
end
return {status, cfg.tokens, cfg.tokens - w.total, reset_ms(w, now), retry, reserved,
        cfg.rpm, rpm_remaining, w.epoch or '', cfg.slug, cfg.cap, w.cur, now, tokens,
        q and reset_ms(q, now) or 0, cfg.conc, in_flight}
