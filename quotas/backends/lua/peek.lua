-- peek: a budget snapshot of every layer, charging nothing (expired buckets are dropped on
-- the way). Counters without an epoch are seeded from the ledger figures the caller passes.
-- KEYS: [1] pending zset, [2 .. 1+N] the layers' counters.
-- ARGV: [1] now ms override or "", [2] index of the primary layer (0: none), [3] N layers,
--       [4 ..] 7 values per layer (see _window.lua), then S seeded layers and, per seeded
--       layer, its index, its new epoch, P pairs, and P pairs of bucket index, units.
-- Returns {1, tokens reserved in the primary counter, requests in flight, total, reset ms
--          of every layer...}, or {-3, layer index, ...}: these counters must be seeded.
local now = clock(ARGV[1])
local n = tonumber(ARGV[3])
local layers = read_layers(2, 4, n, now)
local at = 4 + 7 * n
for _ = 1, tonumber(ARGV[at]) do
  local i, epoch, count = tonumber(ARGV[at + 1]), ARGV[at + 2], tonumber(ARGV[at + 3])
  if not layers[i].epoch then
    local budget = layers[i].budget
    layers[i] = layer_seed(layers[i], now, epoch, at + 4, count)
    layers[i].budget, layers[i].amount, layers[i].epoch = budget, 0, epoch
  end
  at = at + 3 + 2 * count
end
local unbuilt = {-3}
for i, w in ipairs(layers) do
  if not w.epoch then unbuilt[#unbuilt + 1] = i end
end
if #unbuilt > 1 then return unbuilt end
local primary = layers[tonumber(ARGV[2])]
local out = {1, primary and primary.reserved or 0,
             redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')}
for _, v in ipairs(layer_figures(layers, now)) do out[#out + 1] = v end
return out
