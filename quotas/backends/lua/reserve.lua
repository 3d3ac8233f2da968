-- reserve: decide a request against every limit that applies to it (its layers: the user's
-- windows, the team's, the global ones, per metric and model) and charge them all, or charge
-- nothing.
-- KEYS: [1] the user's pending zset, [2] reservations hash, [3] rejected-attempts window,
--       [4] the due registry, [5] the config version key, [6 .. 5+N] one counter per layer.
-- ARGV: [1] now ms override or "", [2] mode: "r" records a reservation (the user's share of
--       a decision), "c" only checks and charges the layers (the share of another Redis
--       Cluster slot: KEYS[1..5] are then not touched), "R" as "r" but a missing config
--       version key is not made here ({-2, ""}: on Redis Cluster each slot holds a copy
--       of the version, and the caller restores a lost copy from the others),
--       [3] the config version the caller's limits were read at, or "" (not checked here),
--       [4] reservation id, [5] reservation TTL ms, [6] concurrency limit (0: none),
--       [7] rejected attempts allowed per window (0: none; the window is read only while
--       the primary counter's 'ab' is not past, see _window.lua), [8] its window ms, [9] its
--       bucket ms, [10] index of the primary layer (its counter keeps `rv`; 0: none),
--       [11] estimated tokens, [12] estimated cost (micro-dollars), [13] team,
--       [14] the layers' counter names, [15] model: kept in the reservation record,
--       [16] N layers, [17 ..] 7 values per layer (see _window.lua), then
--       [17+7N] S seeded layers, and per seeded layer: its index, its new epoch, P, and P
--       pairs of bucket index, units (the ledger's figures).
-- Returns {status, refusing layer index, retry-after ms, now ms, primary epoch, primary
--          bucket, tokens reserved in the primary counter, requests in flight (counted only
--          under a concurrency limit), then total and reset ms of every layer}
-- status: 1 allowed; 0 over a layer's budget; 3 over concurrency; 6 duplicate reservation
--         id; 7 over the rejected-attempts allowance; -2 the caller's limits are stale:
--         {-2, current version}; -3 counters without an epoch must be seeded first:
--         {-3, layer index, ...}. Every refusal charges nothing.
local now = clock(ARGV[1])
local mode, rid, n = ARGV[2], ARGV[4], tonumber(ARGV[16])
local records = mode ~= 'c'
local first = 17 + LAYER_ARGS * n

if ARGV[3] ~= '' then
  local version = redis.call('GET', KEYS[5])
  if not version then  -- a Redis without the key (new, or it lost its data): a new version
    if mode == 'R' then return {-2, ''} end
    version = tostring(now)
    redis.call('SET', KEYS[5], version)
  end
  if version ~= ARGV[3] then return {-2, version} end
end

local layers = read_layers(6, 17, n, now)
local at = first + 1
for _ = 1, tonumber(ARGV[first]) do
  local i, epoch, count = tonumber(ARGV[at]), ARGV[at + 1], tonumber(ARGV[at + 2])
  if not layers[i].epoch then
    local budget, amount = layers[i].budget, layers[i].amount
    layers[i] = layer_seed(layers[i], now, epoch, at + 3, count)
    layers[i].budget, layers[i].amount, layers[i].epoch = budget, amount, epoch
  end
  at = at + 3 + 2 * count
end
local unbuilt = {-3}
for i, w in ipairs(layers) do
  if not w.epoch then unbuilt[#unbuilt + 1] = i end
end
if #unbuilt > 1 then return unbuilt end

local status, refusing, retry, in_flight = 1, 0, 0, 0
local attempts_limit = tonumber(ARGV[7])
local primary = layers[tonumber(ARGV[10])]
local attempts_until = nil
if records and attempts_limit > 0 then
  -- The attempts window is read unless the primary counter's 'ab' says no attempt counts
  -- any more: every attempt updates an 'ab' it finds (attempt.lua), and a counter without
  -- one (new, rebuilt, reset) has the window read and learns 'ab' with its charge.
  local known = primary and primary.attempts_until
  if not known or known > now then
    local a = open_window(KEYS[3], now, tonumber(ARGV[8]), tonumber(ARGV[9]))
    if a.total >= attempts_limit then
      status, retry = 7, wait_ms(a, 1, attempts_limit, now)
    end
    attempts_until = now + reset_ms(a, now)
  end
end
if status == 1 then
  for i, w in ipairs(layers) do
    local wait = 0
    if w.amount > 0 then wait = layer_wait(w, now) end
    -- The request fits once every layer has room: the longest wait is the binding one.
    if wait > 0 and (refusing == 0 or wait > retry) then
      status, refusing, retry = 0, i, wait
    end
  end
  local concurrency = tonumber(ARGV[6])
  if records and concurrency > 0 then
    in_flight = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
    if in_flight >= concurrency then
      if status == 1 then status = 3 end
      -- A slot frees when another request finishes, which no clock can tell: a short hint.
      retry = math.max(retry, 1000)
    end
  end
end

local reserved = primary and primary.reserved or 0
local bucket = primary and primary.cur or 0
if status == 1 and records then
  local record = table.concat({'v2', bucket, ARGV[11], now, ARGV[12], ARGV[13], ARGV[14],
                               ARGV[15]}, ':')
  if redis.call('HSETNX', KEYS[2], rid, record) == 0 then status = 6 end  -- charge nothing
end
if status == 1 then
  local first_in_bucket = false
  for _, w in ipairs(layers) do
    if w == primary then
      reserved = reserved + tonumber(ARGV[11])
      local extra = {'rv', reserved}
      if attempts_until then extra[3], extra[4] = 'ab', attempts_until end
      first_in_bucket = layer_charge(w, w.amount, extra)
    elseif w.amount > 0 then
      layer_charge(w, w.amount)
    end
  end
  if records then
    local ttl = tonumber(ARGV[5])
    redis.call('ZADD', KEYS[1], now + ttl, rid)
    -- LT: a later deadline leaves the key's earliest one in place (one write, no read).
    redis.call('ZADD', KEYS[4], 'LT', now + ttl, KEYS[1])
    -- Settles and expiry delete these keys when they empty, which leaves nothing reserved:
    -- with tokens still reserved they exist, and a refresh once per bucket keeps them alive
    -- longer than any reservation in them.
    if not primary or primary.reserved == 0 or first_in_bucket then
      local keep = ttl + (primary and primary.ttl or 0)
      redis.call('PEXPIRE', KEYS[1], keep)
      redis.call('PEXPIRE', KEYS[2], keep)
    end
  end
end
local out = {status, refusing, retry, now, primary and primary.epoch or '', bucket, reserved,
             in_flight}
for _, v in ipairs(layer_figures(layers, now)) do out[#out + 1] = v end
return out
