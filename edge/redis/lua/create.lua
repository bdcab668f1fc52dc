--[[
create.lua: create a key record, unless its kid is taken.

KEYS[1]  edge:key:{kid}   the record to create
ARGV[1]  sha256 hex of the new key
ARGV[2…] field, value pairs to store (plan, name, owner, rpm, rpd, scopes, credits, expires,
         …); two pseudo-fields: `created` (unix s) is the creation time the caller already
         read from Redis (default: Redis time now), and `expires_in` (seconds) is stored as
         `expires` = the creation time + that many seconds.

Sets hash, status = active, created, requests = 0.
Reply: the creation time (unix s), or 0 when the kid already exists.
]]

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local now = tonumber(redis.call('TIME')[1])
for i = 2, #ARGV, 2 do
  if ARGV[i] == 'created' then now = tonumber(ARGV[i + 1]) end
end
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'status', 'active', 'created', now, 'requests', 0)
for i = 2, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'expires_in' then
    name, value = 'expires', now + tonumber(value)
  end
  if name ~= 'created' then redis.call('HSET', KEYS[1], name, value) end
end
return now
