-- Check every limit of one request and charge all of them, or none.
-- Time is Redis TIME: replicas' clocks do not matter. Keys share the tenant's hash tag.
-- KEYS: 1 tenant bucket, 2 key bucket, 3 day counts, 4 leases (zset), 5 lease payloads
--       (hash), 6 lease index (lease id -> tenant), 7 expired payloads (list)
-- ARGV: 1 cost, 2 tokens, 3 burst, 4 rate/s, 5 key burst (0: none), 6 key rate/s,
--       7 requests/day, 8 tokens/day (-1: none), 9 concurrent, 10 lease ttl ms,
--       11 lease id, 12 payload, 13 day ttl s, 14 now in ms (0: Redis TIME; tests only)
local now = tonumber(ARGV[14])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local cost, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])

-- Leases past their expiry are ended first; their payloads wait for the incomplete record.
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, id in ipairs(expired) do
  local payload = redis.call('HGET', KEYS[5], id)
  if payload then redis.call('RPUSH', KEYS[7], payload) end
  redis.call('HDEL', KEYS[5], id)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  redis.call('LTRIM', KEYS[7], -100000, -1)
  redis.call('PEXPIRE', KEYS[7], 86400000)
end

-- A bucket hash also records until when its key is kept ('exp'), and the tenant's
-- bucket until when the lease keys are ('lexp'): TTLs are pushed out only when they run
-- short, not on every check (writes are most of a script's cost in Redis).
local function take(key, burst, rate)
  local state = redis.call('HMGET', key, 'level', 'ts', 'exp', 'lexp')
  local level, ts = tonumber(state[1]), tonumber(state[2])
  if level == nil then level, ts = burst, now end
  local elapsed = math.max(0, now - ts) / 1000.0
  level = math.min(burst, level + elapsed * rate)
  local need = math.min(cost, burst)
  local kept, lkept = tonumber(state[3]) or 0, tonumber(state[4]) or 0
  if level >= need then return 1, 0, level - need, math.max(now, ts), kept, lkept end
  return 0, (need - level) / rate, level, math.max(now, ts), kept, lkept
end

-- Charge a bucket: its state lasts until it would be full again (refill_ms); the key is
-- kept at least that long past now, pushing its TTL out only when less is left.
local function charge(key, level, stamp, refill_ms, kept, extra)
  if kept - now < refill_ms + 1000 then
    kept = now + 2 * refill_ms + 1000
    redis.call('HSET', key, 'level', tostring(level), 'ts', stamp, 'exp', kept, unpack(extra))
    redis.call('PEXPIRE', key, kept - now)
  else
    redis.call('HSET', key, 'level', tostring(level), 'ts', stamp, unpack(extra))
  end
end

local counts = redis.call('HMGET', KEYS[3], 'requests', 'tokens')
local requests, used = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
local held = redis.call('ZCARD', KEYS[4])
local burst, rate = tonumber(ARGV[3]), tonumber(ARGV[4])
local ok, retry, level, stamp, kept, lkept = take(KEYS[1], burst, rate)
-- {allowed, denied_by, retry_after_ms, requests_today, tokens_today, rate_left_milli, held}
if ok == 0 then return {0, 'rate', math.ceil(retry * 1000), requests, used, math.floor(level * 1000), held} end
local untaken = math.floor((level + math.min(cost, burst)) * 1000)
local kburst, krate = tonumber(ARGV[5]), tonumber(ARGV[6])
local kok, kretry, klevel, kstamp, kkept = 1, 0, 0, now, 0
if kburst > 0 then
  kok, kretry, klevel, kstamp, kkept = take(KEYS[2], kburst, krate)
  if kok == 0 then return {0, 'key_rate', math.ceil(kretry * 1000), requests, used, untaken, held} end
end
if requests + cost > tonumber(ARGV[7]) then return {0, 'day', 0, requests, used, untaken, held} end
local tday = tonumber(ARGV[8])
if tday >= 0 and used + tokens > tday then return {0, 'tokens_day', 0, requests, used, untaken, held} end
if held >= tonumber(ARGV[9]) then return {0, 'concurrent', 0, requests, used, untaken, held} end

-- Every limit passed: charge them all.
local ttl = tonumber(ARGV[10])
-- The lease keys must outlive their newest lease (now + ttl). An empty lease set was
-- deleted by Redis, so one made now by ZADD has no TTL yet: always set it then.
local lease_keys = {}
if held == 0 or lkept - now < ttl + 1000 then
  lkept = now + 2 * ttl
  lease_keys = {'lexp', lkept}
end
charge(KEYS[1], level, stamp, math.ceil(burst / rate * 1000), kept, lease_keys)
if kburst > 0 then charge(KEYS[2], klevel, kstamp, math.ceil(kburst / krate * 1000), kkept, {}) end
requests = redis.call('HINCRBY', KEYS[3], 'requests', cost)
used = redis.call('HINCRBY', KEYS[3], 'tokens', tokens)
-- The day's counts are made by this script's first charge of the day (or by
-- add_usage, which sets its own TTL); releases only change counts that exist.
if requests == cost then redis.call('EXPIRE', KEYS[3], tonumber(ARGV[13])) end
local id = ARGV[11]
if redis.call('ZADD', KEYS[4], 'NX', now + ttl, id) == 0 then
  -- The same request id twice (a client's own x-request-id): a lease of its own.
  id = id .. '#' .. redis.call('INCR', KEYS[4] .. ':seq')
  redis.call('PEXPIRE', KEYS[4] .. ':seq', ttl * 2)
  redis.call('ZADD', KEYS[4], now + ttl, id)
end
redis.call('HSET', KEYS[5], id, ARGV[12])
if #lease_keys > 0 then
  redis.call('PEXPIRE', KEYS[4], lkept - now)
  redis.call('PEXPIRE', KEYS[5], lkept - now)
end
redis.call('SET', KEYS[6] .. id, ARGV[12], 'PX', ttl * 2)
return {1, '', 0, requests, used, math.floor(level * 1000), held + 1}
