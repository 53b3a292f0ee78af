"""The Lua scripts of the Redis Streams adapter (each runs atomically on the server; see `redis` for the design)."""

from __future__ import annotations

import hashlib
from typing import Any

from redis.exceptions import ResponseError

from ductape_processor.adapters.brokers.redis_connection import Command, PipelinedConnection

# Takes back due entries: parked ones whose delay passed, then abandoned ones (idle past owner deadline + grace).
# Returns {next cursor, {{id, delivery count, {field, value, ...}}, ...}}.
_RECLAIM_LUA = """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local want, park, park_ms = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local grace, unknown_ms, cursor, scan = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local out = {}
local function claim(id, min_idle)
  local got = redis.call('XCLAIM', stream, group, me, min_idle, id)
  local entry = got[1]
  if type(entry) == 'table' then
    local info = redis.call('XPENDING', stream, group, id, id, 1)[1]
    out[#out + 1] = {entry[1], info[4], entry[2]}
  end
end
for _, row in ipairs(redis.call('XPENDING', stream, group, 'IDLE', park_ms, '-', '+', want, park)) do
  claim(row[1], park_ms)
end
local next_cursor = cursor
if #out < want then
  local start = '-'
  if cursor ~= '-' then start = '(' .. cursor end
  local rows = redis.call('XPENDING', stream, group, 'IDLE', grace, start, '+', scan)
  local seen = 0
  for _, row in ipairs(rows) do
    if #out >= want then break end
    local owner, idle = row[2], row[3]
    if owner ~= park then
      local threshold = (tonumber(string.match(owner, '^ductape:(%d+):')) or unknown_ms) + grace
      if idle >= threshold then claim(row[1], threshold) end
    end
    next_cursor = row[1]
    seen = seen + 1
  end
  if seen == #rows and #rows < scan then next_cursor = '-' end
end
return {next_cursor, out}
"""

# Parks the given entries (if this consumer still owns them) until their idle time reaches PARK_MS. With `lower` = 1
# their delivery counter goes down by one: they were fetched but never handed to a client, so their next delivery
# carries the same attempt number (JUSTID leaves the counter as it is otherwise).
_PARK_LUA = """
local stream, group, me, park, idle, lower = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local parked = 0
for i = 6, #ARGV do
  local info = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)[1]
  if info and info[2] == me then
    local count = info[4]
    if lower == 1 and count > 0 then count = count - 1 end
    redis.call('XCLAIM', stream, group, park, 0, ARGV[i], 'IDLE', idle, 'RETRYCOUNT', count, 'JUSTID')
    parked = parked + 1
  end
end
return parked
"""

# Parks everything the consumer holds (due now; entries not handed out keep their attempt number), then deletes it.
_CLOSE_LUA = """
local stream, group, me, park, park_ms = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local held = {}
for i = 5, #ARGV do held[ARGV[i]] = true end
local ok = redis.pcall('XPENDING', stream, group, '-', '+', 1, me)
if type(ok) == 'table' and ok.err then return -1 end
local moved, start = 0, '-'
while true do
  local rows = redis.call('XPENDING', stream, group, start, '+', 100, me)
  if #rows == 0 then break end
  for _, row in ipairs(rows) do
    local count = row[4]
    if not held[row[1]] and count > 0 then count = count - 1 end
    redis.call('XCLAIM', stream, group, park, 0, row[1], 'IDLE', park_ms, 'RETRYCOUNT', count, 'JUSTID')
    moved = moved + 1
    start = '(' .. row[1]
  end
end
redis.call('XGROUP', 'DELCONSUMER', stream, group, me)
return moved
"""

# Trims what no group needs any more and deletes long-idle consumers with nothing pending.
_MAINTAIN_LUA = """
local stream, stale, park = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local groups = redis.pcall('XINFO', 'GROUPS', stream)
if type(groups) ~= 'table' or groups.err then return 0 end
local keep = nil
for _, raw in ipairs(groups) do
  local g = fields(raw)
  local from = g['last-delivered-id']
  if g['pending'] > 0 then
    local oldest = redis.call('XPENDING', stream, g['name'])[2]
    if less(oldest, from) then from = oldest end
  end
  if keep == nil or less(from, keep) then keep = from end
  for _, rawc in ipairs(redis.call('XINFO', 'CONSUMERS', stream, g['name'])) do
    local c = fields(rawc)
    if c['pending'] == 0 and c['idle'] > stale then
      redis.call('XGROUP', 'DELCONSUMER', stream, g['name'], c['name'])
    end
  end
end
if keep == nil then return redis.call('XTRIM', stream, 'MAXLEN', '~', 0) end  -- no group: nobody can read them
return redis.call('XTRIM', stream, 'MINID', '~', keep)
"""


class Script:
    """A Lua script run by its SHA1 (EVALSHA), and sent whole (EVAL) when the server does not know it yet."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def run(self, connection: PipelinedConnection, key: str, args: Command) -> Any:
        try:
            return await connection.one(b"EVALSHA", self.sha, 1, key, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await connection.one(b"EVAL", self.source, 1, key, *args)


RECLAIM = Script(_RECLAIM_LUA)
PARK = Script(_PARK_LUA)
CLOSE = Script(_CLOSE_LUA)
MAINTAIN = Script(_MAINTAIN_LUA)
