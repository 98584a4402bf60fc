-- Sliding-window rate limiter for a whole delivery batch: many users, one EVALSHA.
-- Semantics are the original design's Go RateLimiter.Allow, message by message, per user:
--   1. blocked (permanent, or t < blocked_until)          -> code -1
--   2. drop window times older than t - window            (closed window [t - N, t])
--   3. count >= max: violations += 1 (code = violations);
--      violations >= threshold -> block (code -2), violations = 0
--   4. else record t (code 0); count <= floor(max / 2) -> violations = 0
-- Denied messages are not recorded in the window (as in the original design).
-- Never touches a whitelisted user's state. Every user key has a TTL (except a permanent
-- block), so idle users cost nothing. Cost per user: one GET and at most one SET.
-- Keys (single instance / Sentinel; the {user} hash tag keeps one user's keys together):
--   qywx:rl:{user}:st   string "v|bu|perm|h1,h2,..|t1,t2,.." : violations, blocked until
--                       (ms), permanent 0/1, block start times (progressive penalty),
--                       allowed message times in the window (ms, oldest first)
--   qywx:rl:{user}:adm  hash why, by: who/what caused the current block (admin reads)
--   qywx:rl:groups      hash user -> group set by an operator (beats the resolver)
--   qywx:rl:overrides   hash user -> "window_ms,max,thr,block_ms,exp_ms" temporary rule
--   qywx:rl:blocked     zset user -> blocked until (ms, +inf when permanent)
-- ARGV: now_ms ("" = Redis TIME), progressive 0/1, multiplier, max_block_ms, history_ms,
--       G, G x (name, window_ms, max, threshold, block_ms),
--       U, U x (user, group, n, nt, nt x time_ms)   (nt = 0: all n messages at now)
-- Returns {now_ms, blocked_now, {one string per user}}: '' when every message of the user
-- is allowed (the common case, kept small because reply parsing costs the client), else
-- "codes|blocked_until|violations|perm|group|blocks_started|last_block_ms|window_ms|max|thr"
-- with codes comma-separated: 0 allow, k > 0 rate limited (violation k), -1 blocked,
-- -2 this message started a block.

local SLACK_MS = 60000
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local progressive = ARGV[2] == '1'
local multiplier = tonumber(ARGV[3])
local max_block = tonumber(ARGV[4])
local history = tonumber(ARGV[5])

local function num(x)
  return string.format('%d', x)
end

local function split(s)
  local out = {}
  if s then
    for item in string.gmatch(s, '[^,]+') do
      out[#out + 1] = tonumber(item)
    end
  end
  return out
end

local rules = {}
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  rules[ARGV[i]] = {tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
                    tonumber(ARGV[i + 4])}
  i = i + 5
end

-- Parse the batch first, so operator groups and overrides are read in one call each.
local nusers = tonumber(ARGV[i])
i = i + 1
local users = {}
for u = 1, nusers do
  local nt = tonumber(ARGV[i + 3])
  users[u] = {ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), i + 4, nt}
  i = i + 4 + nt
end
local names = {}
for u = 1, nusers do
  names[u] = users[u][1]
end
local function hmget_all(key)
  local out = {}
  if nusers == 0 or redis.call('EXISTS', key) == 0 then
    return out
  end
  for start = 1, nusers, 1000 do
    local stop = math.min(start + 999, nusers)
    local got = redis.call('HMGET', key, unpack(names, start, stop))
    for k = 1, stop - start + 1 do
      out[start + k - 1] = got[k]
    end
  end
  return out
end
local admin_groups = hmget_all('qywx:rl:groups')
local overrides = hmget_all('qywx:rl:overrides')

local out = {}
for u = 1, nusers do
  local user, group, n, first, nt = unpack(users[u])
  local codes = {}
  if admin_groups[u] then
    group = admin_groups[u]
  end
  if group == 'whitelist' then
    out[u] = ''
  else
    local rule = rules[group] or rules['default']
    if overrides[u] then
      local o = split(overrides[u])
      if o[5] > now then
        rule = o
        group = 'override'
      end
    end
    local window, maxm, thr, block = rule[1], rule[2], rule[3], rule[4]
    local key = 'qywx:rl:{' .. user .. '}:st'
    local raw = redis.call('GET', key)
    local v, bu, perm, hist, ts = 0, 0, false, {}, {}
    if raw then
      local f = {}
      for part in string.gmatch(raw .. '|', '([^|]*)|') do
        f[#f + 1] = part
      end
      v, bu, perm = tonumber(f[1]) or 0, tonumber(f[2]) or 0, f[3] == '1'
      hist, ts = split(f[4]), split(f[5])
    end
    local changed = false
    local head = 1
    local last = ts[#ts] or 0
    local blocks, last_block = 0, 0
    for k = 1, n do
      local t = (nt > 0 and tonumber(ARGV[first + k - 1])) or now
      if t < last then
        t = last -- times never run backwards within a user
      end
      last = t
      if perm or t < bu then
        codes[k] = -1
      else
        local cutoff = t - window
        while head <= #ts and ts[head] < cutoff do
          head = head + 1
          changed = true
        end
        local count = #ts - head + 1
        if count >= maxm then
          v = v + 1
          codes[k] = v
          changed = true
          if v >= thr and block > 0 then
            local kept = {}
            for _, h in ipairs(hist) do
              if h >= t - history then
                kept[#kept + 1] = h
              end
            end
            local dur = block
            if progressive then
              dur = math.min(block * multiplier ^ #kept, max_block)
            end
            kept[#kept + 1] = t
            hist = kept
            bu = t + dur
            v = 0
            codes[k] = -2
            blocks = blocks + 1
            last_block = dur
            redis.call('ZADD', 'qywx:rl:blocked', num(bu), user)
            redis.call('HSET', 'qywx:rl:{' .. user .. '}:adm',
                       'why', 'auto: ' .. thr .. ' consecutive violations', 'by', 'ratelimiter')
            redis.call('PEXPIRE', 'qywx:rl:{' .. user .. '}:adm', num(dur + SLACK_MS))
          end
        else
          ts[#ts + 1] = t
          changed = true
          codes[k] = 0
          if count + 1 <= math.floor(maxm / 2) then
            v = 0
          end
        end
      end
    end
    if changed then
      local win = {}
      for k = head, #ts do
        win[#win + 1] = num(ts[k])
      end
      local hs = {}
      for k = 1, #hist do
        hs[k] = num(hist[k])
      end
      local value = num(v) .. '|' .. num(bu) .. '|' .. (perm and '1' or '0') .. '|'
        .. table.concat(hs, ',') .. '|' .. table.concat(win, ',')
      local ttl = math.max(window, bu - now)
      if #hist > 0 then
        ttl = math.max(ttl, hist[#hist] + history - now)
      end
      redis.call('SET', key, value, 'PX', num(ttl + SLACK_MS))
    end
    local denied = false
    for k = 1, n do
      if codes[k] ~= 0 then
        denied = true
        break
      end
    end
    if denied then
      -- Every number through num(): Lua's tostring writes 1e+14 for large values, which
      -- the client cannot parse (after this script already counted the whole batch).
      out[u] = table.concat(codes, ',') .. '|' .. num(bu) .. '|' .. num(v) .. '|'
        .. (perm and '1' or '0') .. '|' .. group .. '|' .. num(blocks) .. '|'
        .. num(last_block) .. '|' .. num(window) .. '|' .. num(maxm) .. '|' .. num(thr)
    else
      out[u] = ''
    end
  end
end
redis.call('ZREMRANGEBYSCORE', 'qywx:rl:blocked', '-inf', num(now))
return {num(now), redis.call('ZCARD', 'qywx:rl:blocked'), out}
