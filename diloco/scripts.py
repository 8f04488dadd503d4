"""Every Lua script, each a named constant wrapped by a typed Python function.

Each script opens with a comment saying what every KEYS[i] and ARGV[i] holds. Keys always come in
through KEYS (built by `diloco.keys`), never inside Lua, so the scripts work on Redis Cluster.
redis-py's `register_script` caches the SHA and falls back to EVAL after a script flush.
"""

from __future__ import annotations

import redis

from diloco import keys
from diloco.errors import LockLost

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
-- KEYS[1] config hash, KEYS[2] head hash, KEYS[3] datasets hash;
-- ARGV = {n, n config field/value pairs, m, m head field/value pairs, dataset id, dataset length}.
-- Creates the run only if it has no config yet. 1 if created, 0 if it existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[1])
local i = 2
for _ = 1, n do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]); i = i + 2 end
local m = tonumber(ARGV[i]); i = i + 1
for _ = 1, m do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2 end
redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1])
return 1
"""

COMMIT = """
-- KEYS[1] lock, KEYS[2] head hash, KEYS[3] versions stream, KEYS[4] deltas stream.
-- ARGV[1] lock value '<token>:<aggregator>', ARGV[2] base version, ARGV[3] fencing token,
-- ARGV[4] weights key, ARGV[5] weights sha256, ARGV[6] momentum key, ARGV[7] momentum sha256,
-- ARGV[8..] round-stat field/value pairs for the versions stream.
-- Returns the new version, or an error 'LOCK_LOST' / 'STALE <current version>'.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LOCK_LOST') end
local current = redis.call('HGET', KEYS[2], 'version')
if current ~= ARGV[2] then return redis.error_reply('STALE ' .. tostring(current)) end
local new = tostring(tonumber(ARGV[2]) + 1)
local t = redis.call('TIME')
local ms = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
-- Announcements for the new version all come after the deltas stream's current last entry, so
-- the next round reads the stream from there instead of from the beginning.
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local since = '0-0'
if #last > 0 then since = last[1][1] end
redis.call('HSET', KEYS[2], 'version', new, 'token', ARGV[3], 'weights', ARGV[4],
           'weights_sha256', ARGV[5], 'momentum', ARGV[6], 'momentum_sha256', ARGV[7],
           'committed_ms', ms, 'deltas_since', since)
local entry = {'version', new, 'token', ARGV[3], 'weights', ARGV[4], 'weights_sha256', ARGV[5],
               'momentum', ARGV[6], 'momentum_sha256', ARGV[7], 'committed_ms', ms}
for i = 8, #ARGV do entry[#entry + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], '*', unpack(entry))
return tonumber(new)
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

    def acquire_lock(self, run: str, aggregator: str, ttl_ms: int) -> int:
        return int(self.acquire(keys=[keys.lock(run), keys.lock_token(run)], args=[aggregator, ttl_ms]))

    def renew_if_owner(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(self.renew(keys=[key], args=[value, ttl_ms]))

    def release_if_owner(self, key: str, value: str) -> bool:
        return bool(self.delete_if_owner(keys=[key], args=[value]))

    def register_worker(self, run: str, worker: str, nonce: str, ttl_ms: int, host: str) -> bool:
        k = [keys.worker_alive(run, worker), keys.workers(run), keys.worker_stats(run, worker)]
        return bool(self.register(keys=k, args=[worker, nonce, ttl_ms, host]))

    def init_run(self, run: str, config: dict[str, str], head: dict[str, str],
                 dataset_id: str, dataset_len: int) -> bool:
        args: list[str | int] = [len(config)]
        for k, v in config.items():
            args += [k, v]
        args.append(len(head))
        for k, v in head.items():
            args += [k, v]
        args += [dataset_id, dataset_len]
        return bool(self.init(keys=[keys.config(run), keys.head(run), keys.datasets(run)], args=args))

    def commit(self, run: str, *, lock_value: str, base_version: int, token: int,
               weights: tuple[str, str], momentum: tuple[str, str], stats: dict[str, str]) -> int:
        """Advance the version pointer; LockLost if our lock or base version is gone."""
        args: list[str | int] = [lock_value, base_version, token, *weights, *momentum]
        for k, v in stats.items():
            args += [k, v]
        try:
            return int(self.commit_script(keys=[keys.lock(run), keys.head(run), keys.versions(run), keys.deltas(run)],
                                          args=args))
        except redis.ResponseError as e:
            msg = str(e)
            if msg.startswith(("LOCK_LOST", "STALE")):
                raise LockLost(f"commit of version {base_version + 1} refused: {msg}") from None
            raise
