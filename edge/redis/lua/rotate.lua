--[[
rotate.lua: give a key a new secret; optionally keep the old one valid for a grace period.

KEYS[1]  edge:key:{kid}   the record
ARGV[1]  sha256 hex of the new key
ARGV[2]  grace in seconds: the old key stays valid until Redis time + grace (0 = dies now)

Reply: Redis time (unix s) on success, 0 when the record does not exist, -1 when it is revoked.
]]

local current = redis.call('HMGET', KEYS[1], 'hash', 'status')
if not current[1] then return 0 end
if current[2] == 'revoked' then return -1 end
local now = tonumber(redis.call('TIME')[1])
local grace = tonumber(ARGV[2])
-- the previous secret's use (admit.lua counts it) starts again with the new previous secret
redis.call('HDEL', KEYS[1], 'previous_key_requests', 'previous_key_last_used')
if grace > 0 then
  redis.call('HSET', KEYS[1], 'prev_hash', current[1], 'prev_until', now + grace)
else
  redis.call('HDEL', KEYS[1], 'prev_hash', 'prev_until')
end
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'rotated', now)
return now
