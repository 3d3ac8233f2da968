-- settle: apply actual - estimate to the bucket the reservation was charged to, release its
-- concurrency slot, forget it, and put its ledger record in the outbox (KEYS[5]) in the same
-- step, so no settle can happen without its record. Idempotent: an unknown reservation id
-- changes nothing.
-- KEYS and ARGV[1..5]: see _window.lua. KEYS[6]: this id's settled marker (a string key
-- that makes a repeated settle of an id Redis does not know change nothing). KEYS[7] the
-- backlog registry, KEYS[8] the due registry (see _window.lua).
-- The marker is written only when the caller's epoch is not the window's, so a normal
-- settle leaves no key behind.
-- ARGV[6] reservation id, ARGV[7] actual tokens (integer >= 0; -1: the estimate stands),
-- ARGV[8] the epoch the reservation was made in ("" when unknown: never charge anew),
-- ARGV[9] ledger status, ARGV[10] prompt tokens or "", ARGV[11] completion tokens or "",
-- ARGV[12] estimate, ARGV[13] reserved at ms, ARGV[14] model: the caller's figures, used
-- when Redis no longer knows the reservation (and the model also when it knows no model).
-- Outbox record: "s:estimate:actual:reserved at ms:settled at ms:prompt:completion:status:model"
-- Returns {status, tokens applied to the window, estimate, reserved at ms, limit, remaining,
--          reset ms, actual tokens, model}
-- status: 1 settled; 0 unknown id (already settled or expired); 2 the window was rebuilt
-- since the reservation (Redis lost it): the actual usage is charged to the current bucket;
-- 3 the window is not built yet: nothing charged, the ledger row will seed it.
local now = clock(ARGV[1])
local window_ms, bucket_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local rid, actual = ARGV[6], tonumber(ARGV[7])

local function to_outbox(estimate, reserved_at, model)
  if model == '' then model = ARGV[14] end
  redis.call('HSET', KEYS[5], rid, table.concat({'s', estimate, actual, reserved_at, now,
             ARGV[10], ARGV[11], ARGV[9], model}, ':'))
  redis.call('PEXPIRE', KEYS[5], OUTBOX_TTL_MS)
  note_backlog(KEYS[7], KEYS[5], now)
end
local rec = redis.call('HGET', KEYS[4], rid)
local w = open_window(KEYS[1], now, window_ms, bucket_ms)
local limit = 0
if w.cfg then limit = parse_cfg(w.cfg).tokens end

if not rec then
  -- Unknown id: a repeated settle (same epoch, or the caller does not know it) changes nothing.
  -- Otherwise Redis lost the reservation; a known actual figure is still charged (status 2) or
  -- left for the ledger row to seed the window when it is rebuilt (status 3).
  local epoch = w.epoch
  local status = 0
  if actual >= 0 and ARGV[8] ~= '' and epoch ~= ARGV[8] then
    -- Claim the id first: a repeat of this settle finds the marker and changes nothing.
    if redis.call('SET', KEYS[6], 1, 'NX', 'PX', w.ttl) then
      if epoch then
        status = 2
        charge(w, actual)
      else
        status = 3
      end
    end
  end
  local charged = 0
  if status == 2 then charged = actual end
  if status ~= 0 then to_outbox(ARGV[12], ARGV[13], '') end
  return {status, charged, 0, now, limit, limit - w.total, reset_ms(w, now),
          math.max(actual, 0), ''}
end

local bucket, estimate, created, model = string.match(rec, '^(%-?%d+):(%d+):(%d+):(.*)$')
bucket, estimate, created = tonumber(bucket), tonumber(estimate), tonumber(created)
if actual < 0 then actual = estimate end
local applied = 0
if bucket >= w.first then
  -- A bucket still in the window takes the difference, so refunds and extra charges age out
  -- when the original usage does. A bucket already gone takes nothing.
  local field = slot(w.nb, bucket)
  local before = tonumber(redis.call('HGET', KEYS[1], field)) or 0
  local after = math.max(before + actual - estimate, 0)
  applied = after - before
  if after == 0 then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HSET', KEYS[1], field, after)
  end
  w.total = math.max(w.total + applied, 0)
end
redis.call('HSET', KEYS[1], 't', w.total, 'rv', math.max(w.reserved - estimate, 0))
redis.call('HDEL', KEYS[4], rid)
redis.call('ZREM', KEYS[3], rid)
if ARGV[8] ~= '' and ARGV[8] ~= w.epoch then
  -- The caller did not know this reservation was made (its reserve timed out after the
  -- script ran, and it served the request degraded). A repeat of its settle finds no
  -- reservation and an epoch that is not its own: the marker makes it change nothing.
  redis.call('SET', KEYS[6], 1, 'PX', w.ttl)
end
note_due(KEYS[8], KEYS[3])
to_outbox(estimate, created, model)
return {1, applied, estimate, created, limit, limit - w.total, reset_ms(w, now), actual, model}
