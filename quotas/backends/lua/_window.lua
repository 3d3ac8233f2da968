-- Shared helpers, prepended to every script of this folder when it is registered.
--
-- Every limit has one counter: a Redis hash. A *sliding* counter holds
--   <slot> -> units charged in one bucket; bucket index = floor(ms / bucket_ms) and
--             slot = index % buckets per window. Small slot numbers keep the hash compact;
--             a slot is reused only after open_window dropped the bucket that left it.
--   t   -> running total of the live buckets
--   o   -> oldest bucket index that may still hold units (cursor for incremental expiry)
--   n   -> newest bucket index charged
-- A *calendar* counter (a day or a month that resets at its boundary) holds
--   t   -> total of the current period, ps -> the period's start (ms)
--   px  -> the start of the period whose end (plus PERIOD_GRACE_MS) the key's TTL was set
--          to: written with each PEXPIRE, so a charge in the same period sets none
-- Both hold
--   e   -> epoch: set when the counter is created or rebuilt from the ledger; a counter
--          without one was never built (or Redis lost it), so the caller must seed it first
-- The user's primary token counter (the plan's hourly budget) also holds
--   rv  -> tokens held by reservations not yet settled
--   rs  -> when an admin last reset the window (ms): older usage no longer counts
--   ab  -> no rejected attempt counts after this ms (see attempt.lua): written by a reserve
--          that read the attempts window, kept true by every attempt while it is there
-- Every script uses the Redis server clock (TIME) unless ARGV[1] overrides it (tests only).
--
-- A *layer* is one limit a request is decided against, passed in ARGV as 7 values:
--   kind ('s' sliding, 'c' calendar; upper case 'S' / 'C': a counter without an epoch
--   starts empty instead of asking to be seeded from the ledger), budget, amount (units
--   this request charges),
--   then sliding: window ms, bucket ms, -, - ; calendar: four consecutive period
--   boundaries (ms) around the client's clock, the current period between the 2nd and 3rd
--   (the script picks the one that holds Redis's own clock).

-- The user's own keys, under the user's {hash tag}: w the primary token counter (its
-- window is WINDOW_SECONDS), q the requests-per-minute counter, p the pending zset
-- (reservation id -> deadline ms), r the reservations hash (id -> record, see
-- parse_pending), x the ledger outbox hash (id -> record of a settled or expired
-- reservation until its ledger row is written; see settle.lua and expire.lua), a the
-- rejected-attempts window (see attempt.lua).
-- expire.lua, buckets.lua and audit.lua take the common layout of earlier versions:
--   KEYS: [1] w, [2] q, [3] p, [4] r, [5] x; ARGV: [1] now ms override or "", [2] window ms,
--   [3] bucket ms, [4] request window ms, [5] request bucket ms.
-- Two registries per key prefix (not per user: no hash tag; on Redis Cluster, one pair per
-- hash slot, under a hash tag of that slot, since a script reaches only its own slot) tell
-- the ledger sweep where its work is, without SCAN, and the health check how old the
-- ledger's backlog is:
--   backlog zset: outbox key -> ms since its oldest record not yet acknowledged waits
--                 (added by settle.lua and expire.lua, kept true by ack.lua);
--   due zset:     pending key -> no later than the earliest deadline of its reservations
--                 (reserve.lua lowers it, expire.lua sets it true or removes the key when
--                 it has none; a settle leaves it, so an entry may be early: the sweep
--                 then finds nothing due there and corrects it).
-- The registries have no TTL: their entries leave when the sweep finds their keys empty,
-- and an entry whose key expired costs the sweep one look.

-- An outbox record waits at most this long for its ledger row (a week without a sweep).
local OUTBOX_TTL_MS = 7 * 24 * 3600 * 1000
-- A calendar counter outlives its period by this much (late settles still find it).
local PERIOD_GRACE_MS = 3600 * 1000
local LAYER_ARGS = 7

local function clock(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function slot(nb, b)
  return b % nb
end

-- Opens a sliding window at `now`: drops the buckets that left it (amortised O(1): each
-- bucket is dropped once, and the cursor never scans past the newest bucket charged), and
-- reads the hash's bookkeeping fields in the same call, with the units of the bucket holding
-- `at` (ms; the current bucket when nil): the one bucket the script will charge or correct,
-- which then takes no read of its own (w.held_bucket, w.held).
-- A bucket leaves the window when its *end* is a window old, so no unit ever stops counting
-- before it is a full window old: window / bucket + 1 buckets are live at once.
local function open_window(key, now, window_ms, bucket_ms, at)
  local nb = math.floor(window_ms / bucket_ms) + 1
  local cur = math.floor(now / bucket_ms)
  local held_bucket = cur
  if at then held_bucket = math.floor(at / bucket_ms) end
  local w = {key = key, nb = nb, bms = bucket_ms, ttl = window_ms + 2 * bucket_ms,
             cur = cur, first = cur - nb + 1, at = at, held_bucket = held_bucket}
  local held_slot = slot(nb, held_bucket)
  local vals = redis.call('HMGET', key, 't', 'o', 'n', 'e', 'rv', 'ab', held_slot)
  local total = tonumber(vals[1]) or 0
  local oldest = tonumber(vals[2])
  w.newest = tonumber(vals[3])
  w.epoch = vals[4] or nil
  w.reserved = tonumber(vals[5]) or 0
  w.attempts_until = tonumber(vals[6])
  w.held = tonumber(vals[7]) or 0
  w.has_cursor = oldest ~= nil
  if oldest and oldest < w.first then
    local stop = w.first - 1
    if w.newest and w.newest < stop then stop = w.newest end
    for b = oldest, stop do
      local v = redis.call('HGET', key, slot(nb, b))
      if v then
        total = total - tonumber(v)
        redis.call('HDEL', key, slot(nb, b))
        -- What was read there belonged to a bucket that left (a slot is reused only after
        -- its bucket was dropped here): the held bucket holds nothing yet.
        if slot(nb, b) == held_slot then w.held = 0 end
      end
    end
    if total < 0 then total = 0 end
    redis.call('HSET', key, 'o', w.first, 't', total)
  end
  w.total = total
  return w
end

-- Adds units to the current bucket and writes it with the bookkeeping (plus any `extra`
-- field/value pairs) in one HSET: the bucket's units were read when the window opened (the
-- script is atomic, so nothing changed them since); a window opened for another bucket
-- adds them with an HINCRBY of their own. The TTL is refreshed once per bucket: one set
-- earlier in the same bucket already outlives every bucket charged so far (and the hash
-- never empties while it holds units, so it cannot have been recreated without one).
-- Returns whether this was the first charge of the bucket.
local function charge(w, units, extra)
  local fields = {}
  if w.held_bucket == w.cur then
    w.held = w.held + units
    fields = {slot(w.nb, w.cur), w.held}
  else
    redis.call('HINCRBY', w.key, slot(w.nb, w.cur), units)
  end
  w.total = w.total + units
  local first_in_bucket = not w.newest or w.newest < w.cur
  if first_in_bucket then w.newest = w.cur end
  fields[#fields + 1], fields[#fields + 2] = 't', w.total
  fields[#fields + 1], fields[#fields + 2] = 'n', w.newest
  if not w.has_cursor then
    fields[#fields + 1], fields[#fields + 2] = 'o', w.first
    w.has_cursor = true
  end
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  redis.call('HSET', w.key, unpack(fields))
  if first_in_bucket then redis.call('PEXPIRE', w.key, w.ttl) end
  return first_in_bucket
end

-- Milliseconds until `need` more fits under `limit`: the moment enough counted units have
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

-- Milliseconds until every counted unit has left the window.
local function reset_ms(w, now)
  if w.total <= 0 or not w.newest then return 0 end
  local ms = (w.newest + w.nb) * w.bms - now
  if ms < 0 then return 0 end
  return ms
end

-- Applies `delta` to the bucket a reservation made at `created` was charged to, if that
-- bucket is still in the window (a bucket already gone takes nothing). Never below zero.
-- Writes the bucket (unless it empties: then it is deleted) and the total with the `extra`
-- field/value pairs in one HSET, when the window was opened for that bucket (its units
-- read then); otherwise the bucket takes an HINCRBY of its own. Returns the units really
-- applied.
local function correct(w, created, delta, extra)
  local bucket = math.floor(created / w.bms)
  local fields = {}
  local applied = 0
  if delta ~= 0 and bucket >= w.first then
    local field = slot(w.nb, bucket)
    local read = bucket == w.held_bucket
    local after
    if read then
      after = w.held + delta
    else
      after = redis.call('HINCRBY', w.key, field, delta)
    end
    applied = delta
    if after <= 0 then  -- emptied (or below zero: an admin reset came between)
      redis.call('HDEL', w.key, field)
      applied = delta - after
      if read then w.held = 0 end
    elseif read then
      w.held = after
      fields = {field, after}
    end
    w.total = math.max(w.total + applied, 0)
    fields[#fields + 1], fields[#fields + 2] = 't', w.total
  end
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  if #fields > 0 then redis.call('HSET', w.key, unpack(fields)) end
  return applied
end

-- Seeds a sliding window Redis lost (or never had) with the ledger's units per bucket
-- (pairs of bucket index, units from ARGV[from] on, `count` pairs), stamps its epoch, and
-- reopens it.
local function seed_window(w, now, epoch, from, count)
  local total, oldest, newest = w.total, nil, w.newest
  for i = from, from + 2 * count - 1, 2 do
    local b, v = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if b >= w.first and b <= w.cur and v > 0 then
      redis.call('HINCRBY', w.key, slot(w.nb, b), v)
      total = total + v
      if not oldest or b < oldest then oldest = b end
      if not newest or b > newest then newest = b end
    end
  end
  redis.call('HSET', w.key, 'e', epoch, 't', total, 'o', oldest or w.first)
  if newest then redis.call('HSET', w.key, 'n', newest) end
  redis.call('PEXPIRE', w.key, w.ttl)
  return open_window(w.key, now, w.bms * (w.nb - 1), w.bms, w.at)
end

-- Opens a calendar counter: the period holding `now` among the client's boundaries. A
-- counter still holding an older period starts the new one at zero.
local function open_period(key, now, b1, b2, b3, b4)
  local start, stop = b2, b3
  if now < b2 then start, stop = b1, b2 elseif now >= b3 then start, stop = b3, b4 end
  local vals = redis.call('HMGET', key, 't', 'ps', 'e', 'px')
  local w = {key = key, calendar = true, start = start, stop = stop, cur = start,
             epoch = vals[3] or nil, ttl = stop - now + PERIOD_GRACE_MS}
  local ps = tonumber(vals[2])
  w.total = tonumber(vals[1]) or 0
  -- The TTL already lasts until this period's end plus the grace: TIME and key expiry run
  -- on the same clock, so `ttl` set at any moment of the period is that same moment.
  w.expiring = tonumber(vals[4]) == start
  if ps and ps < start then
    w.total = 0
    redis.call('HSET', key, 't', 0, 'ps', start)
  elseif not ps then
    w.fresh = true
  end
  w.newest = w.total > 0 and start or nil
  return w
end

-- Adds units to the period's total, in one HSET with the period's start on its first charge
-- and any `extra` field/value pairs (the total was read when the counter opened: the script
-- is atomic). The TTL is set once per period (see open_period).
local function charge_period(w, units, extra)
  w.total = w.total + units
  local fields = {'t', w.total}
  if w.fresh then
    fields[3], fields[4] = 'ps', w.start
    w.fresh = false
  end
  if not w.expiring then
    fields[#fields + 1], fields[#fields + 2] = 'px', w.start
  end
  for _, v in ipairs(extra or {}) do fields[#fields + 1] = v end
  redis.call('HSET', w.key, unpack(fields))
  if not w.expiring then
    redis.call('PEXPIRE', w.key, w.ttl)
    w.expiring = true
  end
end

local function correct_period(w, created, delta, extra)
  local fields = extra or {}
  local applied = 0
  if delta ~= 0 and created >= w.start then
    local after = math.max(w.total + delta, 0)
    applied = after - w.total
    w.total = after
    fields = {'t', after, unpack(fields)}
  end
  if #fields > 0 then redis.call('HSET', w.key, unpack(fields)) end
  return applied
end

-- The seed of a calendar counter: the ledger's units of the current period (the pairs'
-- units whose bucket, a period start, is this period's).
local function seed_period(w, epoch, from, count)
  local total = w.total
  for i = from, from + 2 * count - 1, 2 do
    if tonumber(ARGV[i]) == w.start then total = total + tonumber(ARGV[i + 1]) end
  end
  redis.call('HSET', w.key, 'e', epoch, 't', total, 'ps', w.start, 'px', w.start)
  redis.call('PEXPIRE', w.key, w.ttl)
  w.total, w.fresh, w.expiring = total, false, true
  w.newest = total > 0 and w.start or nil
  return w
end

-- Layers: the limits of one decision, parsed from ARGV (see the top of this file).
-- `at`: the moment whose bucket the script will charge or correct (nil: now; see
-- open_window).
local function read_layers(first_key, from, count, now, at)
  local layers = {}
  for i = 1, count do
    local a = from + (i - 1) * LAYER_ARGS
    local key = KEYS[first_key + i - 1]
    local w
    local kind = ARGV[a]
    if kind == 'c' or kind == 'C' then
      w = open_period(key, now, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
                      tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]))
    else
      w = open_window(key, now, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), at)
    end
    w.budget, w.amount = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    if not w.epoch and (kind == 'S' or kind == 'C') then w.epoch = '-' end
    layers[i] = w
  end
  return layers
end

local function layer_charge(w, units, extra)
  if w.calendar then
    charge_period(w, units, extra)
    return false
  end
  return charge(w, units, extra)
end

local function layer_wait(w, now)
  if w.total + w.amount <= w.budget then return 0 end
  if w.calendar then return w.stop - now end
  return wait_ms(w, w.amount, w.budget, now)
end

local function layer_reset(w, now)
  if w.calendar then
    if w.total > 0 then return w.stop - now end
    return 0
  end
  return reset_ms(w, now)
end

local function layer_correct(w, created, delta, extra)
  if w.calendar then return correct_period(w, created, delta, extra) end
  return correct(w, created, delta, extra)
end

local function layer_seed(w, now, epoch, from, count)
  if w.calendar then return seed_period(w, epoch, from, count) end
  return seed_window(w, now, epoch, from, count)
end

-- {total, reset ms} of every layer, flattened: what the caller's headers are made from.
local function layer_figures(layers, now)
  local out = {}
  for i, w in ipairs(layers) do
    out[2 * i - 1] = w.total
    out[2 * i] = layer_reset(w, now)
  end
  return out
end

-- A reservation record (the reservations hash): {bucket, tokens, reserved at ms, cost,
-- team, counters, model}. Records are "v2:<primary bucket>:<tokens>:<reserved at>:<cost>:
-- <team>:<counters>:<model>"; records made before layered limits, "<bucket>:<tokens>:
-- <reserved at>:<model>", read with no cost, team or counters.
local function parse_pending(rec)
  if string.sub(rec, 1, 3) == 'v2:' then
    local b, t, at, cost, team, counters, model =
      string.match(rec, '^v2:(%-?%d+):(%d+):(%d+):(%d*):([^:]*):([^:]*):(.*)$')
    return {bucket = tonumber(b), tokens = tonumber(t), at = tonumber(at),
            cost = tonumber(cost) or 0, team = team, counters = counters, model = model}
  end
  local b, t, at, model = string.match(rec, '^(%-?%d+):(%d+):(%d+):(.*)$')
  return {bucket = tonumber(b), tokens = tonumber(t), at = tonumber(at), cost = 0, team = '',
          counters = '', model = model}
end

-- The outbox `outbox` has a record waiting since `now` (unless an older one already waits).
local function note_backlog(registry, outbox, now)
  redis.call('ZADD', registry, 'NX', now, outbox)
end

-- Records the earliest deadline left in the pending zset `pending` (or that it has none).
local function note_due(registry, pending)
  local first = redis.call('ZRANGE', pending, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', registry, pending)
  else
    redis.call('ZADD', registry, first[2], pending)
  end
end
