"""Every Lua script, each a named constant wrapped by a typed Python function.

Each script opens with a comment saying what every KEYS[i] and ARGV[i] holds. Keys always come in
through KEYS (built by `diloco.keys`), never inside Lua, so the scripts work on Redis Cluster.
redis-py's `register_script` caches the SHA and falls back to EVAL after a script flush.
"""

from __future__ import annotations

import redis

from diloco import keys
from diloco.errors import LockLost, UnitConflict

ACQUIRE_LOCK = """
-- KEYS[1] lock, KEYS[2] fencing-token counter; ARGV[1] aggregator id, ARGV[2] ttl ms.
-- Returns the new fencing token, or 0 if another aggregator holds the lock.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return token
"""

RENEW_IF_OWNER = """
-- KEYS[1] a key with TTL; ARGV[1] the value we wrote, ARGV[2] ttl ms. 1 if renewed, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

DELETE_IF_OWNER = """
-- KEYS[1] a key; ARGV[1] the value we wrote. Deletes it only if it is still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

REGISTER_WORKER = """
-- KEYS[1] worker alive key, KEYS[2] set of workers, KEYS[3] worker stats hash;
-- ARGV[1] worker id, ARGV[2] session nonce, ARGV[3] ttl ms, ARGV[4] host.
-- 1 if registered (or renewed), 0 if another live session holds the id.
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], 'nonce', ARGV[2], 'host', ARGV[4], 'state', 'starting',
           'registered_ms', tostring(t[1] * 1000 + math.floor(t[2] / 1000)))
return 1
"""

INIT_RUN = """
-- KEYS[1] config hash, KEYS[2..] further hashes of a new run (head, datasets, units meta).
-- ARGV = for each KEYS[j] in order: n, then n field/value pairs.
-- Creates the run only if it has no config yet, all at once. 1 if created, 0 if it existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local i = 1
for j = 1, #KEYS do
  local n = tonumber(ARGV[i]); i = i + 1
  for _ = 1, n do redis.call('HSET', KEYS[j], ARGV[i], ARGV[i + 1]); i = i + 2 end
end
return 1
"""

COMMIT = """
-- KEYS[1] lock, KEYS[2] head hash, KEYS[3] versions stream,
-- KEYS[4..] for each epoch whose units the round trained on: done bitmap, leases, owners, claimed.
-- ARGV[1] lock value '<token>:<aggregator>', ARGV[2] base version, ARGV[3] fencing token,
-- ARGV[4] weights key, ARGV[5] weights digest, ARGV[6] momentum key, ARGV[7] momentum digest,
-- ARGV[8] the id of the last deltas-stream entry the round read (the next round reads after it,
-- so an announcement that landed during the reduce is read, and rejected as late, not skipped),
-- ARGV[9] the encoded update's shard keys and ARGV[10] their digests, comma-joined ('' for none:
-- set every commit, so a head never keeps the update of an older version),
-- ARGV[11] m, then m round-stat field/value pairs for the versions stream,
-- then k (epochs), then for each epoch: c, then c (unit bit, worker id) pairs.
-- Returns the new version, or an error: 'LOCK_LOST', 'STALE <current version>', or
-- 'UNIT <worker> <bit> <why>' when a unit is already done or leased to another worker; then
-- nothing changes, so no unit is ever committed twice. A unit leased to nobody counts: its lease
-- ended (or Redis was recovered from a snapshot) while the worker trained, and nobody else holds
-- it, so the work is kept rather than redone; it is marked claimed with done, so no claim takes it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LOCK_LOST') end
local current = redis.call('HGET', KEYS[2], 'version')
if current ~= ARGV[2] then return redis.error_reply('STALE ' .. tostring(current)) end
local m = tonumber(ARGV[11])
local i = 12 + 2 * m
local k = tonumber(ARGV[i]); i = i + 1
local units = {}
for e = 0, k - 1 do
  local done, owners = KEYS[4 + 4 * e], KEYS[6 + 4 * e]
  local c = tonumber(ARGV[i]); i = i + 1
  for _ = 1, c do
    local bit, worker = ARGV[i], ARGV[i + 1]; i = i + 2
    if redis.call('GETBIT', done, bit) == 1 then
      return redis.error_reply('UNIT ' .. worker .. ' ' .. bit .. ' already done')
    end
    local owner = redis.call('HGET', owners, bit)
    if owner and owner ~= worker then
      return redis.error_reply('UNIT ' .. worker .. ' ' .. bit .. ' leased to ' .. owner)
    end
    units[#units + 1] = {e, bit}
  end
end
for _, u in ipairs(units) do
  local base = 4 + 4 * u[1]
  redis.call('SETBIT', KEYS[base], u[2], 1)
  redis.call('ZREM', KEYS[base + 1], u[2])
  redis.call('HDEL', KEYS[base + 2], u[2])
  redis.call('SETBIT', KEYS[base + 3], u[2], 1)
end
local new = tostring(tonumber(ARGV[2]) + 1)
local t = redis.call('TIME')
local ms = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('HSET', KEYS[2], 'version', new, 'token', ARGV[3], 'weights', ARGV[4],
           'weights_digest', ARGV[5], 'momentum', ARGV[6], 'momentum_digest', ARGV[7],
           'committed_ms', ms, 'deltas_since', ARGV[8], 'update', ARGV[9], 'update_digest', ARGV[10])
-- a head first written before BLAKE3 digests (diloco/digest.py) drops its sha256 fields
redis.call('HDEL', KEYS[2], 'weights_sha256', 'momentum_sha256', 'update_sha256')
local entry = {'version', new, 'token', ARGV[3], 'weights', ARGV[4], 'weights_digest', ARGV[5],
               'update', ARGV[9], 'update_digest', ARGV[10],
               'momentum', ARGV[6], 'momentum_digest', ARGV[7], 'committed_ms', ms}
for j = 12, 11 + 2 * m do entry[#entry + 1] = ARGV[j] end
redis.call('XADD', KEYS[3], '*', unpack(entry))
return tonumber(new)
"""


CLAIM_UNITS = """
-- KEYS[1] units meta hash; then for each epoch of the window lo..hi+1 the caller read, in order: its
-- claimed bitmap, leases, owners. ARGV[1] the epoch_lo and ARGV[2] the epoch_hi the caller read,
-- ARGV[3] units wanted, ARGV[4] worker id, ARGV[5] lease ms, ARGV[6..] the window's done bitmaps
-- (read only). The done bitmaps come in ARGV, not KEYS: a Redis ACL checks every declared key of
-- EVAL for read and write, and workers may only read them (diloco/acl.py). They carry the run's
-- hash tag, so the script still touches one Cluster slot.
-- All or nothing, so a claim never waits holding units (two such waits deadlocked each other):
-- first releases expired leases of units not done and moves epoch_lo past a fully done epoch; then
-- takes the ARGV[3] lowest free units, oldest epoch first, opening epochs as it goes. The window's
-- last epoch (hi+1) is fresh and init checks that an epoch has at least a round's units, so the
-- window always holds enough. Returns {'e:bit', ...}, or {'RETRY'} when lo or hi moved (the
-- caller's KEYS name other epochs and it must read the meta again); never fewer units than asked.
local lo = tonumber(redis.call('HGET', KEYS[1], 'epoch_lo'))
local hi = tonumber(redis.call('HGET', KEYS[1], 'epoch_hi'))
if lo ~= tonumber(ARGV[1]) or hi ~= tonumber(ARGV[2]) then return {'RETRY'} end
local n = tonumber(redis.call('HGET', KEYS[1], 'num_units'))
local k = (#KEYS - 1) / 3
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for j = 0, k - 1 do
  local claimed, leases, owners, done = KEYS[2 + 3 * j], KEYS[3 + 3 * j], KEYS[4 + 3 * j], ARGV[6 + j]
  for _, u in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
    if redis.call('GETBIT', done, u) == 0 then redis.call('SETBIT', claimed, u, 0) end
    redis.call('ZREM', leases, u)
    redis.call('HDEL', owners, u)
  end
end
if redis.call('BITCOUNT', ARGV[6], 0, n - 1, 'BIT') == n then
  redis.call('HSET', KEYS[1], 'epoch_lo', lo + 1)
  if hi < lo + 1 then redis.call('HSET', KEYS[1], 'epoch_hi', lo + 1) end
  return {'RETRY'}
end
local want = tonumber(ARGV[3])
local free = 0
for j = 0, k - 1 do free = free + n - redis.call('BITCOUNT', KEYS[2 + 3 * j], 0, n - 1, 'BIT') end
if free < want then return {'RETRY'} end  -- only if the window is stale; the caller reads the meta again
local out = {}
for j = 0, k - 1 do
  local e = lo + j
  local claimed, leases, owners = KEYS[2 + 3 * j], KEYS[3 + 3 * j], KEYS[4 + 3 * j]
  -- BITPOS with an explicit range finds no clear bit past the string's end: give it full length.
  if redis.call('STRLEN', claimed) < math.ceil(n / 8) then redis.call('SETBIT', claimed, n - 1, 0) end
  local pos = 0
  while #out < want and pos < n do
    local p = redis.call('BITPOS', claimed, 0, pos, n - 1, 'BIT')
    if p < 0 then break end
    if e > hi then  -- open the next epoch: the ones before have no free unit left
      redis.call('HSET', KEYS[1], 'epoch_hi', e)
      hi = e
    end
    redis.call('SETBIT', claimed, p, 1)
    redis.call('ZADD', leases, now + tonumber(ARGV[5]), p)
    redis.call('HSET', owners, p, ARGV[4])
    out[#out + 1] = e .. ':' .. p
    pos = p + 1
  end
  if #out >= want then break end
end
return out
"""

RENEW_UNITS = """
-- KEYS[1] leases of one epoch, KEYS[2] owners of that epoch; ARGV[1] worker id, ARGV[2] lease ms,
-- ARGV[3..] unit bits. Extends the leases the worker still holds; returns how many it holds.
local t = redis.call('TIME')
local expiry = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2])
local held = 0
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    held = held + 1
  end
end
return held
"""

RELEASE_UNITS = """
-- KEYS[1] claimed, KEYS[2] leases, KEYS[3] owners of one epoch; ARGV[1] worker id, ARGV[2] the
-- epoch's done bitmap (read only, so in ARGV: see CLAIM_UNITS), ARGV[3..] unit bits. Gives back the
-- units the worker holds that are not done, so they are issued again now rather than when the lease
-- would end. Returns how many were released.
local released = 0
for i = 3, #ARGV do
  local u = ARGV[i]
  if redis.call('HGET', KEYS[3], u) == ARGV[1] and redis.call('GETBIT', ARGV[2], u) == 0 then
    redis.call('SETBIT', KEYS[1], u, 0)
    redis.call('ZREM', KEYS[2], u)
    redis.call('HDEL', KEYS[3], u)
    released = released + 1
  end
end
return released
"""


REJECT = """
-- KEYS[1] set of rejected entry ids, KEYS[2] rejections stream, KEYS[3] per-worker counts hash;
-- ARGV[1] entry id, ARGV[2] worker id, ARGV[3..] field/value pairs of the rejection.
-- Records a rejection once per entry: a round redone after a crash reads the same entries again.
-- Returns 1 if recorded, 0 if this entry was rejected before.
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', unpack(fields))
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""


class Scripts:
    """The scripts registered on one client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.acquire = client.register_script(ACQUIRE_LOCK)
        self.renew = client.register_script(RENEW_IF_OWNER)
        self.delete_if_owner = client.register_script(DELETE_IF_OWNER)
        self.register = client.register_script(REGISTER_WORKER)
        self.init = client.register_script(INIT_RUN)
        self.commit_script = client.register_script(COMMIT)
        self.claim = client.register_script(CLAIM_UNITS)
        self.reject_script = client.register_script(REJECT)
        self.renew_units_script = client.register_script(RENEW_UNITS)
        self.release_units_script = client.register_script(RELEASE_UNITS)

    def acquire_lock(self, run: str, aggregator: str, ttl_ms: int) -> int:
        return int(self.acquire(keys=[keys.lock(run), keys.lock_token(run)], args=[aggregator, ttl_ms]))

    def renew_if_owner(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(self.renew(keys=[key], args=[value, ttl_ms]))

    def release_if_owner(self, key: str, value: str) -> bool:
        return bool(self.delete_if_owner(keys=[key], args=[value]))

    def register_worker(self, run: str, worker: str, nonce: str, ttl_ms: int, host: str) -> bool:
        k = [keys.worker_alive(run, worker), keys.workers(run), keys.worker_stats(run, worker)]
        return bool(self.register(keys=k, args=[worker, nonce, ttl_ms, host]))

    def init_run(self, run: str, hashes: dict[str, dict[str, str]]) -> bool:
        """Create every hash in `hashes` (key -> fields), the run's config first, if the run is new."""
        if next(iter(hashes)) != keys.config(run):
            raise ValueError("the config hash must come first: its existence is the test")
        args: list[str | int] = []
        for fields in hashes.values():
            args.append(len(fields))
            for k, v in fields.items():
                args += [k, v]
        return bool(self.init(keys=list(hashes), args=args))

    def commit(self, run: str, *, lock_value: str, base_version: int, token: int,
               weights: tuple[str, str], momentum: tuple[str, str], stats: dict[str, str],
               dataset: str = "", units: dict[int, list[tuple[int, str]]] | None = None,
               deltas_read: str = "0-0", update: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> int:
        """Advance the version pointer and mark the round's units done.

        `units` maps epoch -> [(unit bit, worker id)]; `update` is the encoded update's (shard keys,
        digests), written into the head. Raises LockLost if our lock or base version
        is gone, UnitConflict (naming the worker) if a unit is not that worker's to commit.
        """
        args: list[str | int] = [lock_value, base_version, token, *weights, *momentum, deltas_read,
                                 ",".join(update[0]), ",".join(update[1]), len(stats)]
        for k, v in stats.items():
            args += [k, v]
        ks = [keys.lock(run), keys.head(run), keys.versions(run)]
        epochs = sorted(units or {})
        args.append(len(epochs))
        for e in epochs:
            ks += [keys.units_done(run, dataset, e), keys.units_leases(run, dataset, e),
                   keys.units_owners(run, dataset, e), keys.units_claimed(run, dataset, e)]
            args.append(len(units[e]))
            for bit, worker in units[e]:
                args += [bit, worker]
        try:
            return int(self.commit_script(keys=ks, args=args))
        except redis.ResponseError as e:
            msg = str(e)
            if msg.startswith(("LOCK_LOST", "STALE")):
                raise LockLost(f"commit of version {base_version + 1} refused: {msg}") from None
            if msg.startswith("UNIT "):
                _, worker, bit, why = msg.split(" ", 3)
                raise UnitConflict(worker, f"unit {bit} {why}") from None
            raise

    def reject(self, run: str, entry_id: str, worker: str, fields: dict[str, str]) -> bool:
        args: list[str] = [entry_id, worker]
        for k, v in fields.items():
            args += [k, v]
        ks = [keys.rejected_entries(run), keys.rejections(run), keys.rejected_counts(run)]
        return bool(self.reject_script(keys=ks, args=args))

    def claim_units(self, run: str, dataset: str, epoch_lo: int, epoch_hi: int, want: int, worker: str,
                    lease_ms: int) -> list[tuple[int, int]] | None:
        """Claim exactly `want` units as [(epoch, bit)]; None if epoch_lo or epoch_hi moved (read them again)."""
        ks, done = [keys.units_meta(run, dataset)], []
        for e in range(epoch_lo, epoch_hi + 2):
            claimed, done_e, leases, owners = keys.epoch_keys(run, dataset, e)
            ks += [claimed, leases, owners]
            done.append(done_e)
        out = self.claim(keys=ks, args=[epoch_lo, epoch_hi, want, worker, lease_ms, *done])
        if out == ["RETRY"]:
            return None
        return [(int(e), int(b)) for e, b in (item.split(":") for item in out)]

    def renew_units(self, run: str, dataset: str, epoch: int, worker: str, bits: list[int], lease_ms: int) -> int:
        ks = [keys.units_leases(run, dataset, epoch), keys.units_owners(run, dataset, epoch)]
        return int(self.renew_units_script(keys=ks, args=[worker, lease_ms, *bits]))

    def release_units(self, run: str, dataset: str, epoch: int, worker: str, bits: list[int]) -> int:
        claimed, done, leases, owners = keys.epoch_keys(run, dataset, epoch)
        return int(self.release_units_script(keys=[claimed, leases, owners], args=[worker, done, *bits]))
