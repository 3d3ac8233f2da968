-- Shared helpers, prepended to every script of this folder when it is registered.
--
-- A window is one Redis hash per user and limit:
--   <slot> -> tokens charged in one bucket; bucket index = floor(ms / bucket_ms) and
--             slot = index % buckets per window. Small slot numbers keep the hash compact;
--             a slot is reused only after open_window dropped the bucket that left it.
--   t   -> running total of the live buckets
--   o   -> oldest bucket index that may still hold tokens (cursor for incremental expiry)
--   n   -> newest bucket index charged
-- The token window hash also holds:
--   e   -> epoch: set when the window is created or rebuilt from the ledger; a window without
--          one was never built (or Redis lost it), so the caller must rebuild it first
--   cfg -> the user's limits "tokens,rpm,concurrency,max_per_request,default_output,plan_slug"
--          (0 = no such limit)
--   rv  -> tokens held by reservations not yet settled
--   rs  -> when an admin last reset the window (ms): older usage no longer counts
-- Every script uses the Redis server clock (TIME) unless ARGV[1] overrides it (tests only).
-- Common ARGV: [1] now ms override or "", [2] window ms, [3] bucket ms,
--              [4] request window ms, [5] request bucket ms.
-- Common KEYS: [1] token window hash, [2] request window hash, [3] pending zset
--              (reservation id -> deadline ms), [4] reservations hash (id -> record),
--              [5] ledger outbox hash (id -> record of a settled or expired reservation,
--              until its ledger row is written; see settle.lua and expire.lua).
-- Two registries per key prefix (not per user: no hash tag) tell the ledger sweep where its
-- work is, without SCAN, and the health check how old the ledger's backlog is:
--   backlog zset: outbox key -> ms since its oldest record not yet acknowledged waits
--                 (added by settle.lua and expire.lua, kept true by ack.lua);
--   due zset:     pending key -> the earliest deadline of its reservations (reserve.lua,
--                 settle.lua and expire.lua keep it; a key leaves when it has none).

-- An outbox record waits at most this long for its ledger row (a week without a sweep).
local OUTBOX_TTL_MS = 7 * 24 * 3600 * 1000

-- A registry entry's TTL (refreshed whenever it is written): no registry outlives its keys.
local REGISTRY_TTL_MS = OUTBOX_TTL_MS

local function clock(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function slot(nb, b)
  return b % nb
end

-- Opens a window at `now`: drops the buckets that left it (amortised O(1): each bucket is
-- dropped once, and the cursor never scans past the newest bucket charged), and reads the
-- hash's bookkeeping fields in the same call.
-- A bucket leaves the window when its *end* is a window old, so no token ever stops counting
-- before it is a full window old: window / bucket + 1 buckets are live at once.
local function open_window(key, now, window_ms, bucket_ms)
  local nb = math.floor(window_ms / bucket_ms) + 1
  local cur = math.floor(now / bucket_ms)
  local w = {key = key, nb = nb, bms = bucket_ms, ttl = window_ms + 2 * bucket_ms,
             cur = cur, first = cur - nb + 1}
  local vals = redis.call('HMGET', key, 't', 'o', 'n', 'e', 'rv', 'cfg')
  local total = tonumber(vals[1]) or 0
  local oldest = tonumber(vals[2])
  w.newest = tonumber(vals[3])
  w.epoch = vals[4] or nil
  w.reserved = tonumber(vals[5]) or 0
  w.cfg = vals[6] or nil
  w.has_cursor = oldest ~= nil
  if oldest and oldest < w.first then
    local stop = w.first - 1
    if w.newest and w.newest < stop then stop = w.newest end
    for b = oldest, stop do
      local v = redis.call('HGET', key, slot(nb, b))
      if v then
        total = total - tonumber(v)
        redis.call('HDEL', key, slot(nb, b))
      end
    end
    if total < 0 then total = 0 end
    redis.call('HSET', key, 'o', w.first, 't', total)
  end
  w.total = total
  return w
end

-- Adds tokens to the current bucket and writes the bookkeeping (plus any `extra` field/value
-- pairs) in one HSET. The TTL is refreshed once per bucket: one set earlier in the same bucket
-- already outlives every bucket charged so far (and the hash never empties while it holds
-- tokens, so it cannot have been recreated without one). Returns whether this was the first
-- charge of the bucket.
local function charge(w, tokens, extra)
  redis.call('HINCRBY', w.key, slot(w.nb, w.cur), tokens)
  w.total = w.total + tokens
  local first_in_bucket = not w.newest or w.newest < w.cur
  if first_in_bucket then w.newest = w.cur end
  local fields = {'t', w.total, 'n', w.newest}
  if not w.has_cursor then
    fields[#fields + 1], fields[#fields + 2] = 'o', w.first
    w.has_cursor = true
  end
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  redis.call('HSET', w.key, unpack(fields))
  if first_in_bucket then redis.call('PEXPIRE', w.key, w.ttl) end
  return first_in_bucket
end

-- Milliseconds until `need` more fits under `limit`: the moment enough counted tokens have
-- left the window. Bucket b is live while now < (b + nb) * bms.
local function wait_ms(w, need, limit, now)
  local excess = w.total + need - limit
  if excess <= 0 then return 0 end
  local last = w.newest or w.cur
  local freed = 0
  for b = w.first, last do
    local v = tonumber(redis.call('HGET', w.key, slot(w.nb, b)))
    if v then
      freed = freed + v
      if freed >= excess then return (b + w.nb) * w.bms - now end
    end
  end
  return (last + w.nb) * w.bms - now
end

-- Milliseconds until every counted token has left the window.
local function reset_ms(w, now)
  if w.total <= 0 or not w.newest then return 0 end
  local ms = (w.newest + w.nb) * w.bms - now
  if ms < 0 then return 0 end
  return ms
end

local function parse_cfg(cfg)
  local tokens, rpm, conc, cap, out, slug =
    string.match(cfg, '^(%d+),(%d+),(%d+),(%d+),(%d+),(.*)$')
  return {tokens = tonumber(tokens), rpm = tonumber(rpm), conc = tonumber(conc),
          cap = tonumber(cap), out = tonumber(out), slug = slug}
end

-- The user's limits for an open window `w`. When the caller passes them (`cfg_arg`), they are
-- stored; when the window has no epoch it was lost or never built: it is seeded from the
-- ledger figures the caller passed (ARGV pairs of bucket index, tokens, from `seed_from`),
-- stamped with the caller's new epoch, and reopened.
-- Returns the parsed config (nil when none is stored or passed) and the window.
local function load_cfg(w, now, window_ms, bucket_ms, cfg_arg, epoch_arg, seed_from)
  if cfg_arg == '' then
    return w.cfg and parse_cfg(w.cfg), w
  end
  if not w.epoch then
    local total, oldest, newest = w.total, nil, w.newest
    for i = seed_from, #ARGV, 2 do
      local b, v = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
      if b >= w.first and b <= w.cur and v > 0 then
        redis.call('HINCRBY', w.key, slot(w.nb, b), v)
        total = total + v
        if not oldest or b < oldest then oldest = b end
        if not newest or b > newest then newest = b end
      end
    end
    redis.call('HSET', w.key, 'e', epoch_arg, 't', total, 'o', oldest or w.first)
    if newest then redis.call('HSET', w.key, 'n', newest) end
  end
  redis.call('HSET', w.key, 'cfg', cfg_arg)
  redis.call('PEXPIRE', w.key, w.ttl)
  return parse_cfg(cfg_arg), open_window(w.key, now, window_ms, bucket_ms)
end

-- The outbox `outbox` has a record waiting since `now` (unless an older one already waits).
local function note_backlog(registry, outbox, now)
  redis.call('ZADD', registry, 'NX', now, outbox)
  redis.call('PEXPIRE', registry, REGISTRY_TTL_MS)
end

-- Records the earliest deadline left in the pending zset `pending` (or that it has none).
local function note_due(registry, pending)
  local first = redis.call('ZRANGE', pending, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', registry, pending)
  else
    redis.call('ZADD', registry, first[2], pending)
    redis.call('PEXPIRE', registry, REGISTRY_TTL_MS)
  end
end
