--[[
admit.lua: one admission decision for one API key, atomically, in one round trip.

KEYS[1]  edge:key:{kid}      the key record (hash)
KEYS[2]  edge:key:{kid}:m    minute bucket of requests (hash: tokens = float, ts = ms of the
                             last update)
KEYS[3]  edge:key:{kid}:d    day bucket of requests (same fields)
KEYS[4]  edge:key:{kid}:tm   minute bucket of LLM tokens (same fields; may hold debt, < 0)
KEYS[5]  edge:key:{kid}:td   day bucket of LLM tokens (same)
ARGV[1]  sha256 hex of the presented key
ARGV[2]  the request's route: its raw path after "/v1/" (e.g. "chat/completions")
ARGV[3]  the request body's model, as far as the caller read it: "" not read (the body is
         parsed only for keys with model scopes), "~" a bodyless request (GET, DELETE, … with
         no body: nothing to check), "!" read but no usable top-level "model", "=" followed by
         the model
ARGV[4]  credits an admitted request costs (pricing.request, a whole number)
ARGV[5]  days of usage history to keep (usage.retention_days)
ARGV[6…] the plan table, flattened: name, rpm, rpd, tpm, tpd, shadow, name, … (requests
         per window; tokens per window, -1 = no token limit; shadow 1 = observe the plan's
         limits, never enforce them)

Record fields read: hash, prev_hash, prev_until (unix s), plan, rpm, rpd, tpm, tpd (optional
overrides, non-negative integers; anything else falls back to the plan), status (active |
paused | revoked; empty = active), expires (unix s; empty = never; anything else = expired),
requests (a count; anything else is reset), scopes (JSON {"routes": [...], "models": [...]};
model scopes apply to requests with a body; absent, empty or {} = everything; anything but a
JSON object = nothing), credits (absent or empty = unlimited; a whole number, negative after
usage in flight = the balance; anything else = none left), shadow ("1" or "true": the key's
limits are observed, not enforced; "0" or "false": enforced; anything else: the plan's say).
Record fields written on admission: last_used (unix s), requests (+1), credits (- the request
price, if limited). On any answer but 1 and 10 to the previous secret during its grace:
previous_key_requests (+1), previous_key_last_used (unix s).

Usage history (include/usage.lua: hashes per UTC day and hour beside the record), on every
answer to an authenticated key but 10 (which is asked again): requests +1 and credits + the
price on admission; rate_limited +1 on 5, 6, 12 and 13; rejected +1 on 2-4, 7-9 and 11.
Nothing is counted for 1: a stranger's requests are not the key's.

Every field is read and validated before the first write, and every write is one that cannot
fail on any value an operator may have stored (HSET, PEXPIRE, HINCRBY on a checked integer):
garbage in a record gives a defined answer, never an error after a bucket was charged.

Scopes: a route is allowed when it equals a scope route or continues it after a "/"; a model
when it matches a scope glob (`*` any run of characters, `?` one). Globs are matched in time
bounded by the lengths of glob and model (never a backtracking pattern: `*-*-*-*x` against
250 `-` kept Redis busy for 0.8 s that way, one more `*` for 40 s), and a model over 256
bytes is unusable (11). A key with model scopes needs the model: without ARGV[3] the answer
is 10 (read the body and ask again), nothing charged.

Shadow limits: a shadowed key whose request or token buckets would refuse it (5, 6, 12, 13) is
admitted instead with 14, 15, 16 or 17 (the same reply, so the caller can send the real
limit's headers): no bucket is charged for it, the rest is as for an admission (last_used,
requests, the request price from the balance, usage history `requests`). Scopes and credits
are never shadowed.

Time is Redis time (TIME) in milliseconds, never the caller's. Buckets refill continuously:
capacity / 60000 tokens per ms (minute) and capacity / 86400000 per ms (day). A request is
admitted only when both request buckets hold a whole token, every token bucket of the key
(a key has them only with a token limit) holds more than zero, and the balance (if any) is
above zero; then both request buckets are charged one and the balance the request price.
Token buckets are charged later, by settle.lua, with what the answer used. Rejections write
only the usage history and the previous-secret counters. A bucket expires when it would be full again: a missing bucket is a full one. A
bucket timestamp in the future (clock stepped back on failover) refills nothing until Redis
time passes it, and is never trusted for more than one window ahead.

Reply, decoded positionally by proxy/admission.py:
  1 code   0 admitted, 1 unknown key, 2 revoked, 3 expired, 4 paused (not active),
           5 minute bucket empty, 6 day bucket empty, 7 plan not configured,
           8 route or model outside the key's scopes, 9 no credits left,
           10 model needed (the key has model scopes), 11 body unusable for model scopes,
           12 minute token bucket at or below zero, 13 day token bucket at or below zero,
           14-17 admitted in shadow, where 5, 6, 12, 13 would have refused
  2 plan   the record's plan name
  3 rpm    4 rpd      effective limits
  5 minute tokens left (whole)   6 ms until the minute bucket is full
  7 day tokens left (whole)      8 ms until the day bucket is full
  9 ms until the next request could be admitted (0 when admitted)
  10 the balance after this request (0 when the key has none: see 11)
  11 flags: 1 model scopes, + 2 route scopes, + 4 a credit balance
  12 the key's expiry (unix s; 0 = never)
  13 tpm  14 tpd     effective token limits (-1: none)
  15 LLM tokens in the minute bucket (whole, may be negative)  16 ms until it is full
  17 LLM tokens in the day bucket (whole, may be negative)     18 ms until it is full
Codes 1-4 and 7 carry only the first one or two entries; codes 8-11 carry 2, 10, 11 and 12
(and code 8 in entry 3 what was out of scope: 1 the route, 2 the model, 0 unreadable scopes);
entries 13-18 come only for a key with a token limit (no token limit: the reply ends at 12).
]]

local MINUTE, DAY = 60000, 86400000
local EPS = 1e-9

--#include usage

local function whole(v)
  if v and #v <= 12 and string.match(v, '^%d+$') then return tonumber(v) end
  return nil
end

-- A balance: a whole number, negative after usage that was in flight when it ran out.
local function signed(v)
  if v and #v <= 13 and string.match(v, '^%-?%d+$') then return tonumber(v) end
  return nil
end

local function list_of_strings(v)
  local out = {}
  if type(v) == 'table' then
    for _, item in ipairs(v) do
      if type(item) == 'string' then out[#out + 1] = item end
    end
  end
  return out
end

local function route_allowed(routes, route)
  for _, r in ipairs(routes) do
    if route == r or string.sub(route, 1, #r + 1) == r .. '/' then return true end
  end
  return false
end

-- A glob piece without `*` as a Lua pattern with no quantifier, so matching it never
-- backtracks: `?` is any one byte, everything else literal.
local function piece(text)
  return (string.gsub(text, '[%^%$%(%)%%%.%[%]%+%-%?]', function(c)
    if c == '?' then return '.' end
    return '%' .. c
  end))
end

-- Whether `s` matches `glob`: the pieces between stars in order, the first anchored at the
-- start and the last at the end, each middle one at its leftmost place after the one before
-- (leftmost is always right for `*` globs). At most (#s × #glob) steps, in C.
local function glob_match(glob, s)
  local parts = {}
  for part in string.gmatch(glob .. '*', '([^*]*)%*') do parts[#parts + 1] = part end
  local first, last = parts[1], parts[#parts]
  if #parts == 1 then
    return #s == #first and string.find(s, '^' .. piece(first) .. '$') ~= nil
  end
  if #s < #first + #last then return false end
  if first ~= '' and not string.find(s, '^' .. piece(first)) then return false end
  local pos, stop = #first + 1, #s - #last
  for i = 2, #parts - 1 do
    if parts[i] ~= '' then
      local a, b = string.find(s, piece(parts[i]), pos)
      if not a or b > stop then return false end
      pos = b + 1
    end
  end
  return last == '' or string.find(s, '^' .. piece(last) .. '$', stop + 1) ~= nil
end

local function model_allowed(globs, model)
  for _, g in ipairs(globs) do
    if glob_match(g, model) then return true end
  end
  return false
end

local rec = redis.call('HMGET', KEYS[1], 'hash', 'prev_hash', 'prev_until', 'plan', 'rpm', 'rpd',
  'status', 'expires', 'requests', 'scopes', 'credits', 'tpm', 'tpd', 'previous_key_requests',
  'shadow')
if not rec[1] then return {1} end

local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now = now_s * 1000 + math.floor(tonumber(clock[2]) / 1000)

local previous = rec[1] ~= ARGV[1]  -- the previous secret, during its grace
if previous then
  local grace = whole(rec[3])
  if not (rec[2] == ARGV[1] and grace and now_s < grace) then return {1} end
end

-- An answer to an authenticated key: counted in its usage history (`field` +1, `spent`
-- credits), and for the previous secret in the record too.
local function done(reply, field, spent)
  usage_count(KEYS[1], now_s, tonumber(ARGV[5]), {field, 1, 'credits', spent})
  if previous then
    if whole(rec[14]) then
      redis.call('HINCRBY', KEYS[1], 'previous_key_requests', 1)
    else
      redis.call('HSET', KEYS[1], 'previous_key_requests', 1)
    end
    redis.call('HSET', KEYS[1], 'previous_key_last_used', now_s)
  end
  return reply
end
local function refused(reply) return done(reply, 'rejected', 0) end
local function limited_by(reply) return done(reply, 'rate_limited', 0) end

local plan = rec[4] or ''
local status = rec[7]
if status == 'revoked' then return refused({2, plan}) end
if rec[8] and rec[8] ~= '' then
  local expires = whole(rec[8])
  if not expires or now_s >= expires then return refused({3, plan}) end
end
if status and status ~= '' and status ~= 'active' then return refused({4, plan}) end

local plan_rpm, plan_rpd, plan_tpm, plan_tpd, plan_shadow
for i = 6, #ARGV, 6 do
  if ARGV[i] == plan then
    plan_rpm, plan_rpd = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    plan_tpm, plan_tpd = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    plan_shadow = ARGV[i + 5] == '1'
    break
  end
end
if not plan_rpm then return refused({7, plan}) end

local limited = rec[11] and rec[11] ~= ''
local credits = 0
if limited then credits = signed(rec[11]) or 0 end
local balance_flag = limited and 4 or 0
local expiry = whole(rec[8]) or 0

local scoped = 0
if rec[10] and rec[10] ~= '' then
  local ok, scopes = pcall(cjson.decode, rec[10])
  if not ok or type(scopes) ~= 'table' or scopes[1] ~= nil then  -- not a JSON object: deny
    return refused({8, plan, 0, 0, 0, 0, 0, 0, 0, credits, 2 + balance_flag, expiry})
  end
  local routes, models = list_of_strings(scopes.routes), list_of_strings(scopes.models)
  if #models > 0 then scoped = scoped + 1 end
  if #routes > 0 then scoped = scoped + 2 end
  if #routes > 0 and not route_allowed(routes, ARGV[2]) then
    return refused({8, plan, 1, 0, 0, 0, 0, 0, 0, credits, scoped + balance_flag, expiry})
  end
  if #models > 0 then
    local state = ARGV[3]
    if state == '' then return {10, plan, 0, 0, 0, 0, 0, 0, 0, credits, scoped + balance_flag, expiry} end
    if state ~= '~' then
      if string.sub(state, 1, 1) ~= '=' or #state > 257 then
        return refused({11, plan, 0, 0, 0, 0, 0, 0, 0, credits, scoped + balance_flag, expiry})
      end
      if not model_allowed(models, string.sub(state, 2)) then
        return refused({8, plan, 2, 0, 0, 0, 0, 0, 0, credits, scoped + balance_flag, expiry})
      end
    end
  end
end
if limited and credits <= 0 then
  return refused({9, plan, 0, 0, 0, 0, 0, 0, 0, credits, scoped + balance_flag, expiry})
end

local rpm = whole(rec[5]) or plan_rpm
local rpd = whole(rec[6]) or plan_rpd
local tpm = whole(rec[12]) or plan_tpm
local tpd = whole(rec[13]) or plan_tpd

-- tokens in the bucket now, and the timestamp to store with them (`debt`: the bucket may
-- hold less than zero, as the LLM-token buckets do after a large answer)
local function level(key, cap, window, debt)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if not tokens or not ts or tokens ~= tokens or ts ~= ts then return cap, now end
  local floor = debt and -cap * 1000 or 0  -- a debt of over a thousand windows is garbage
  if tokens > cap then tokens = cap elseif tokens < floor then tokens = floor end
  if ts > now + window then ts = now + window end
  if now > ts then
    if cap > 0 then tokens = math.min(cap, tokens + (now - ts) * cap / window) end
    ts = now
  end
  return tokens, ts
end

-- ms until the bucket holds `target` tokens
local function until_level(tokens, ts, cap, window, target)
  if tokens >= target - EPS then return 0 end
  if cap <= 0 then return window end
  return math.ceil((ts - now) + (target - tokens) * window / cap)
end

local mt, mts = level(KEYS[2], rpm, MINUTE, false)
local dt, dts = level(KEYS[3], rpd, DAY, false)
local flags = scoped + balance_flag

-- the LLM-token buckets, for a key with a token limit: level, and ms until full
local tmt, tm_full, tdt, td_full = 0, 0, 0, 0
local tmts, tdts = now, now
if tpm >= 0 then
  tmt, tmts = level(KEYS[4], tpm, MINUTE, true)
  tm_full = until_level(tmt, tmts, tpm, MINUTE, tpm)
end
if tpd >= 0 then
  tdt, tdts = level(KEYS[5], tpd, DAY, true)
  td_full = until_level(tdt, tdts, tpd, DAY, tpd)
end
-- entries 13-18 of the reply: only for a key with a token limit (the others end at 12)
local function token_fields()
  if tpm < 0 and tpd < 0 then return end
  return tpm, tpd, math.floor(tmt + EPS), tm_full, math.floor(tdt + EPS), td_full
end

-- the record's side of an admission (the buckets are the caller's): last_used, requests, the
-- request price from the balance (entry 10 of the reply), the usage history
local function admitted(reply)
  redis.call('HSET', KEYS[1], 'last_used', now_s)
  if whole(rec[9]) then
    redis.call('HINCRBY', KEYS[1], 'requests', 1)
  else
    redis.call('HSET', KEYS[1], 'requests', 1)
  end
  local price = tonumber(ARGV[4])
  local spent = 0
  if limited and price > 0 then
    credits, spent = credits - price, price
    redis.call('HSET', KEYS[1], 'credits', string.format('%d', credits))
    reply[10] = credits
  end
  return done(reply, 'requests', spent)
end

local shadow = plan_shadow
if rec[15] == '1' or rec[15] == 'true' then shadow = true end
if rec[15] == '0' or rec[15] == 'false' then shadow = false end
local SHADOW_OF = {[5] = 14, [6] = 15, [12] = 16, [13] = 17}

-- a bucket refuses: a 429, or for a shadowed key an admission that charges no bucket
local function limited_or_shadowed(reply)
  if not shadow then return limited_by(reply) end
  reply[1] = SHADOW_OF[reply[1]]
  return admitted(reply)
end

if mt < 1 - EPS or dt < 1 - EPS then
  local code, retry = 5, 0
  if dt < 1 - EPS then
    code, retry = 6, until_level(dt, dts, rpd, DAY, 1)
  end
  if mt < 1 - EPS then
    retry = math.max(retry, until_level(mt, mts, rpm, MINUTE, 1))
  end
  return limited_or_shadowed({code, plan, rpm, rpd,
    math.floor(mt + EPS), until_level(mt, mts, rpm, MINUTE, rpm),
    math.floor(dt + EPS), until_level(dt, dts, rpd, DAY, rpd), retry, credits, flags, expiry,
    token_fields()})
end

-- tokens: admitted while the bucket is above zero; the wait is until it is again
if (tpm >= 0 and tmt <= EPS) or (tpd >= 0 and tdt <= EPS) then
  local code, retry = 12, 0
  if tpd >= 0 and tdt <= EPS then
    code, retry = 13, until_level(tdt, tdts, tpd, DAY, EPS * 2) + 1
  end
  if tpm >= 0 and tmt <= EPS then
    retry = math.max(retry, until_level(tmt, tmts, tpm, MINUTE, EPS * 2) + 1)
  end
  return limited_or_shadowed({code, plan, rpm, rpd,
    math.floor(mt + EPS), until_level(mt, mts, rpm, MINUTE, rpm),
    math.floor(dt + EPS), until_level(dt, dts, rpd, DAY, rpd), retry, credits, flags, expiry,
    token_fields()})
end

mt, dt = math.max(mt - 1, 0), math.max(dt - 1, 0)
local m_full = until_level(mt, mts, rpm, MINUTE, rpm)
local d_full = until_level(dt, dts, rpd, DAY, rpd)
redis.call('HSET', KEYS[2], 'tokens', mt, 'ts', mts)
redis.call('PEXPIRE', KEYS[2], m_full + 1000)
redis.call('HSET', KEYS[3], 'tokens', dt, 'ts', dts)
redis.call('PEXPIRE', KEYS[3], d_full + 1000)
return admitted({0, plan, rpm, rpd, math.floor(mt + EPS), m_full, math.floor(dt + EPS), d_full,
  0, credits, flags, expiry, token_fields()})
