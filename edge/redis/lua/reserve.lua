--[[
reserve.lua: hold a place for a key under its owner's cap, atomically; the owner's index.

KEYS[1]  edge:owner:{<h>}:live   hash: kid → Redis time (unix s) it was reserved; the owner's
                                 keys that are not revoked (h: a digest of the owner)
KEYS[2]  edge:owner:{<h>}:keys   sorted set of "<created>:<kid>" members (all the owner's keys,
                                 revoked too), for listing by owner
ARGV[1]  kid
ARGV[2]  the cap (keys.max_per_owner)
ARGV[3]  the listing member "<created:011d>:<kid>"

Both keys carry the owner's hash tag, so this runs on one slot of a cluster; the key record
lives in its own slot and is written after this succeeds.
Reply: 1 reserved (or already held), 0 the owner is at the cap.
]]

if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], redis.call('TIME')[1])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return 1
