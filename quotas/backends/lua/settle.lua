-- settle: correct every layer a reservation was charged to by (actual - estimate), in the
-- bucket (or calendar period) it was charged to, release its concurrency slot, forget it,
-- and put its ledger record in the outbox (KEYS[3]) in the same step, so no settle can
-- happen without its record. Idempotent: an unknown reservation id changes nothing.
-- KEYS: [1] pending zset, [2] reservations hash, [3] ledger outbox hash, [4] this id's
--       settled marker (a string key that makes a repeated settle of an id Redis does not
--       know change nothing; written only when the caller's epoch is not the primary
--       counter's, so a normal settle leaves no key behind), [5] the backlog registry (see
--       _window.lua), [6 .. 5+N] the layers' counters.
-- ARGV: [1] now ms override or "", [2] reservation id, [3] actual tokens (-1: the estimate
--       stands), [4] actual cost in micro-dollars (-1: the estimate stands), [5] the
--       primary epoch the reservation was made in ("" when unknown: never charge anew),
--       [6] ledger status, [7] prompt tokens or "", [8] completion tokens or "",
--       [9] estimate, [10] reserved at ms, [11] model, [12] estimated cost, [13] team: the
--       caller's figures, used when Redis no longer knows the reservation (and the model
--       also when it knows no model), [14] index of the primary layer (0: none),
--       [15] N layers, [16 ..] 7 values per layer (see _window.lua) whose amount is the
--       layer's metric: "t" tokens, "c" cost, "r" requests (never corrected).
-- Outbox record: "s2:estimate:actual:reserved at:settled at:prompt:completion:status:
--                 estimated cost:actual cost:team:model"
-- Returns {status, tokens applied to the primary counter, estimate, reserved at ms, actual
--          tokens, model, estimated cost, actual cost, team, total, reset ms of every layer...}
-- status: 1 settled; 0 unknown id (already settled or expired); 2 the primary counter was
-- rebuilt since the reservation (Redis lost it): the actual usage is charged to the current
-- bucket of every built layer; 3 the primary counter is not built yet: nothing charged, the
-- ledger row will seed it.
local now = clock(ARGV[1])
local rid, actual, actual_cost = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tonumber(ARGV[15])
-- The reservation first: each window then reads the bucket it was charged to when it opens
-- (see open_window), so correcting that bucket takes no call of its own. An unknown id may
-- charge the current bucket instead (status 2), the one a window reads by default.
local rec = redis.call('HGET', KEYS[2], rid)
local held = rec and parse_pending(rec)
local layers = {}
for i = 1, n do
  local a = 16 + (i - 1) * 7
  if ARGV[a] == 'c' or ARGV[a] == 'C' then
    layers[i] = open_period(KEYS[5 + i], now, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
                            tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]))
  else
    layers[i] = open_window(KEYS[5 + i], now, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
                            held and held.at)
  end
  layers[i].metric = ARGV[a + 2]
  if ARGV[a] == 'S' or ARGV[a] == 'C' then layers[i].epoch = layers[i].epoch or '-' end
end
local primary = layers[tonumber(ARGV[14])]

local function to_outbox(estimate, reserved_at, model, cost_est, team)
  if model == '' then model = ARGV[11] end
  redis.call('HSET', KEYS[3], rid, table.concat({'s2', estimate, actual, reserved_at, now,
             ARGV[7], ARGV[8], ARGV[6], cost_est, actual_cost, team, model}, ':'))
  redis.call('PEXPIRE', KEYS[3], OUTBOX_TTL_MS)
  note_backlog(KEYS[5], KEYS[3], now)
end

local function result(status, applied, estimate, created, model, cost_est, team)
  local out = {status, applied, estimate, created, math.max(actual, 0), model, cost_est,
               math.max(actual_cost, 0), team}
  for _, v in ipairs(layer_figures(layers, now)) do out[#out + 1] = v end
  return out
end

if not rec then
  -- Unknown id: a repeated settle (same epoch, or the caller does not know it) changes
  -- nothing. Otherwise Redis lost the reservation; a known actual figure is still charged
  -- (status 2) or left for the ledger row to seed the counters when rebuilt (status 3).
  local status, charged = 0, 0
  if actual >= 0 and ARGV[5] ~= '' and primary and primary.epoch ~= ARGV[5] then
    -- Claim the id first: a repeat of this settle finds the marker and changes nothing.
    if redis.call('SET', KEYS[4], 1, 'NX', 'PX', primary.ttl) then
      status = 3
      if primary.epoch then
        status = 2
        if actual_cost < 0 then actual_cost = tonumber(ARGV[12]) or 0 end
        for _, w in ipairs(layers) do
          local units = ({t = actual, c = actual_cost, r = 1})[w.metric] or 0
          if w.epoch and units > 0 then layer_charge(w, units) end
        end
        charged = actual
      end
    end
  end
  if status ~= 0 then
    if actual_cost < 0 then actual_cost = tonumber(ARGV[12]) or 0 end
    to_outbox(ARGV[9], ARGV[10], '', ARGV[12], ARGV[13])
  end
  return result(status, charged, 0, now, '', ARGV[12], ARGV[13])
end

local estimate, created, cost_est = held.tokens, held.at, held.cost
local team, model = held.team, held.model
if actual < 0 then actual = estimate end
if actual_cost < 0 then actual_cost = cost_est end
local applied = 0
for _, w in ipairs(layers) do
  local delta = 0
  if w.metric == 't' then delta = actual - estimate elseif w.metric == 'c' then
    delta = actual_cost - cost_est
  end
  if w == primary then
    applied = layer_correct(w, created, delta, {'rv', math.max(w.reserved - estimate, 0)})
  else
    layer_correct(w, created, delta)
  end
end
redis.call('HDEL', KEYS[2], rid)
redis.call('ZREM', KEYS[1], rid)
if ARGV[5] ~= '' and primary and ARGV[5] ~= primary.epoch then
  -- The caller did not know this reservation was made (its reserve timed out after the
  -- script ran, and it served the request degraded). A repeat of its settle finds no
  -- reservation and an epoch that is not its own: the marker makes it change nothing.
  redis.call('SET', KEYS[4], 1, 'PX', primary.ttl)
end
-- The due registry is left as it is: its entry for this user may now be early, which
-- costs the sweep one look (see _window.lua).
to_outbox(estimate, created, model, cost_est, team)
return result(1, applied, estimate, created, model, cost_est, team)
