-- Free one lease and settle its reservation; a second release finds nothing.
-- KEYS: 1 leases (zset), 2 lease payloads (hash), 3 lease index entry, 4 day counts
-- ARGV: 1 lease id, 2 actual tokens (-1: not reported), 3 reserved tokens
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if removed == 0 then return 0 end
local actual = tonumber(ARGV[2])
if actual >= 0 then
  local delta = actual - tonumber(ARGV[3])
  if delta ~= 0 and redis.call('EXISTS', KEYS[4]) == 1 then
    local now_tokens = redis.call('HINCRBY', KEYS[4], 'tokens', delta)
    if now_tokens < 0 then redis.call('HSET', KEYS[4], 'tokens', 0) end
  end
end
return 1
