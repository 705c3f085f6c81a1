-- Free one lease of a known tenant and settle its reservation, all in the tenant's slot
-- (its payload is read from the tenant's hash, so no global index lookup is needed).
-- KEYS: 1 leases (zset), 2 lease payloads (hash)
-- ARGV: 1 lease id, 2 actual tokens (-1: not reported), 3 the tenant's day-count key
--       prefix ("<prefix>:{tenant}:day:"), 4 the lease's global index entry (removed only
--       when the lease was found, so a wrong tenant hint cannot orphan another lease)
-- Returns the lease's payload, or false if it was not held (released or expired).
local payload = redis.call('HGET', KEYS[2], ARGV[1])
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 0 or not payload then return false end
redis.call('DEL', ARGV[4])
local actual = tonumber(ARGV[2])
if actual >= 0 then
  local lease = cjson.decode(payload)
  local delta = actual - tonumber(lease[4])
  local day = ARGV[3] .. lease[3]
  if delta ~= 0 and redis.call('EXISTS', day) == 1 then
    local now_tokens = redis.call('HINCRBY', day, 'tokens', delta)
    if now_tokens < 0 then redis.call('HSET', day, 'tokens', 0) end
  end
end
return payload
