-- usage.lua, included by admit.lua, settle.lua and refund.lua: a key's usage history.
--
-- Per key, per UTC day and per UTC hour of Redis time, a hash beside the record:
--   <record key>:day:YYYY-MM-DD        kept until the day's end + the retention (days)
--   <record key>:hour:YYYY-MM-DDTHH    kept until the hour's end + 48 hours
-- fields: requests (admitted), rate_limited (429s), rejected (the key's other refusals),
-- input_tokens, output_tokens, credits (spent: request prices and token costs, less refunds).
-- The names are built from the record key, so they share its hash tag and slot (Redis allows
-- a script the undeclared keys of its declared slot, on a Cluster too); the date comes from
-- Redis time, as every clock edge reads does. A count never fails the script: a field holding
-- something that is not an integer starts again from this write, and a key of another type
-- is left alone (redis.pcall), so usage can never undo an admission or a charge.

local USAGE_HOURS = 48

-- 'YYYY-MM-DD' of a count of days since 1970-01-01 (the proleptic Gregorian calendar)
local function usage_date(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end

local function usage_add(key, field, n, expire_at)
  local total = redis.pcall('HINCRBY', key, field, n)
  if type(total) ~= 'number' then
    if type(redis.pcall('HSET', key, field, n)) ~= 'number' then return end
    total = n
  end
  if total == n then redis.pcall('EXPIREAT', key, expire_at) end  -- a new field (a new hash)
end

-- Add to the usage of the key whose record is `record` at Redis time `now_s`: `counts` is a
-- flat list of field, amount; zero amounts are skipped.
local function usage_count(record, now_s, retention_days, counts)
  local day, hour = math.floor(now_s / 86400), math.floor(now_s / 3600)
  local date = usage_date(day)
  local day_key = record .. ':day:' .. date
  local hour_key = record .. ':hour:' .. date .. string.format('T%02d', hour % 24)
  for i = 1, #counts, 2 do
    local n = counts[i + 1]
    if n ~= 0 then
      usage_add(day_key, counts[i], n, (day + 1) * 86400 + retention_days * 86400)
      usage_add(hour_key, counts[i], n, (hour + 1 + USAGE_HOURS) * 3600)
    end
  end
end
