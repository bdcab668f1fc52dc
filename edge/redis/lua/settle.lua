--[[
settle.lua: charge what one metered request used, once its answer is whole: its LLM tokens from
the key's token buckets, its token cost from the balance, and the key's token count.
Idempotent per request: a settlement sent again (a retry after a timeout that did run) finds
its id and charges nothing; the id's key holds what the first one charged, so the retry can
still say it (the first reply was lost with its connection).

KEYS[1]  edge:key:{kid}            the key record
KEYS[2]  edge:key:{kid}:tm         minute bucket of LLM tokens (tokens = float, may be < 0; ts = ms)
KEYS[3]  edge:key:{kid}:td         day bucket of LLM tokens
KEYS[4]  edge:key:{kid}:s:<id>     this settlement's id (credits it charged; kept ARGV[6] s)
ARGV[1]  input tokens      ARGV[2]  output tokens
ARGV[3]  the token cost in micro-credits (credits / 1,000,000: prices are per million tokens)
ARGV[4]  tpm  ARGV[5]  tpd (the effective limits admission used; -1 = no such bucket)
ARGV[6]  seconds to remember the id
ARGV[7]  days of usage history to keep (usage.retention_days)

The token cost is exact over any number of requests: the record keeps the part of a credit not
yet charged (`credit_micros`, 0-999999); each settlement adds its cost to it and charges the
whole credits. A balance may go below zero here (usage that was in flight when it ran out);
admission refuses the key until a top-up. A key without a balance (unlimited) is not charged
credits. Token buckets are debited as admit.lua reads them (continuous refill, capped at the
limit) and may go below zero: the next requests wait until they refill. A field that is not a
number is read as admit.lua reads it (a missing or garbled bucket is full; garbled credits are
0), and nothing here can fail after a first write. The key's usage history (include/usage.lua)
gains the tokens and the credits charged, at the hour of the settlement.

Reply: {1, credits charged, balance after} on a settlement; {0, credits the first one charged}
when this id was settled before.
]]

local MINUTE, DAY = 60000, 86400000

--#include usage

if not redis.call('SET', KEYS[4], '0', 'NX', 'EX', tonumber(ARGV[6])) then
  return {0, tonumber(redis.call('GET', KEYS[4])) or 0}
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local used = tonumber(ARGV[1]) + tonumber(ARGV[2])
local now_s = tonumber(clock[1])

local function debit(key, cap, window)
  if cap < 0 then return end
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if not tokens or not ts or tokens ~= tokens or ts ~= ts then tokens, ts = cap, now end
  if tokens > cap then tokens = cap elseif tokens < -cap * 1000 then tokens = -cap * 1000 end
  if ts > now + window then ts = now + window end
  if now > ts then
    if cap > 0 then tokens = math.min(cap, tokens + (now - ts) * cap / window) end
    ts = now
  end
  tokens = tokens - used
  redis.call('HSET', key, 'tokens', tokens, 'ts', ts)
  local full = window
  if cap > 0 then full = math.ceil((ts - now) + (cap - tokens) * window / cap) end
  redis.call('PEXPIRE', key, math.max(full, 0) + 1000)
end

debit(KEYS[2], tonumber(ARGV[4]), MINUTE)
debit(KEYS[3], tonumber(ARGV[5]), DAY)

local rec = redis.call('HMGET', KEYS[1], 'hash', 'tokens', 'credits', 'credit_micros')
if not rec[1] then return {1, 0, 0} end  -- the key is gone: nothing more to write
local function history(charged)
  usage_count(KEYS[1], now_s, tonumber(ARGV[7]),
    {'input_tokens', tonumber(ARGV[1]), 'output_tokens', tonumber(ARGV[2]), 'credits', charged})
end
local total = rec[2]
if total and #total <= 15 and string.match(total, '^%d+$') then
  redis.call('HINCRBY', KEYS[1], 'tokens', used)
else
  redis.call('HSET', KEYS[1], 'tokens', used)
end

local cost = tonumber(ARGV[3])
if not rec[3] or rec[3] == '' or cost <= 0 then
  history(0)
  return {1, 0, 0}
end
local balance = 0
if #rec[3] <= 13 and string.match(rec[3], '^%-?%d+$') then balance = tonumber(rec[3]) end
local micros = 0
if rec[4] and #rec[4] <= 6 and string.match(rec[4], '^%d+$') then micros = tonumber(rec[4]) end
micros = micros + cost
local charged = math.floor(micros / 1000000)
micros = micros - charged * 1000000
balance = balance - charged
redis.call('HSET', KEYS[1], 'credits', string.format('%d', balance),
  'credit_micros', string.format('%d', micros))
if charged > 0 then redis.call('SET', KEYS[4], string.format('%d', charged), 'KEEPTTL') end
history(charged)
return {1, charged, balance}
