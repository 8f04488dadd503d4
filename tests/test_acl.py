"""Redis ACL users per role (diloco/acl.py, `diloco acl`), against the real redis-server.

The `redis_url` fixture is the admin: the default user, with every permission. The `users` fixture
creates the worker, aggregator and evaluator users with fresh passwords and deletes them afterwards
(FLUSHALL leaves users in place), so the shared server ends as it began. A worker and an aggregator
run a real round under their users; then the worker's credentials, which can read the lock value
and everything else an aggregator knows, try every write that would let a worker commit a version
or mark a unit done, and each one is refused with NOPERM and changes nothing.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from redis.exceptions import NoPermissionError

from diloco import acl, keys, runs, units
from diloco.cli import main
from diloco.runs import read_head
from diloco.scripts import Scripts
from diloco.status import snapshot
from diloco.store import open_store
from tests import harness

RUN = "t"  # harness's default run name

def _client(url: str, *, decode: bool = True) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=decode)


@pytest.fixture
def users(redis_url: str) -> dict[str, str]:
    """role -> a redis:// URL that authenticates as that role's user (fresh passwords)."""
    admin = _client(redis_url)
    passwords = {role: secrets.token_hex(16) for role in acl.ROLES}
    acl.apply(admin, passwords)
    netloc = urlsplit(redis_url).netloc
    yield {role: f"redis://{role}:{password}@{netloc}/0" for role, password in passwords.items()}
    admin.acl_deluser(*acl.ROLES)
    admin.close()


def _dump(raw_admin: redis.Redis, run: str) -> dict[bytes, bytes]:
    """Every key of the run and its serialized value (DUMP), to show that nothing changed."""
    return {k: raw_admin.dump(k) for k in raw_admin.scan_iter(match=f"diloco:{{{run}}}:*", count=1000)}


# ---- rules and the command ----

def test_rules_need_a_known_role_and_a_password():
    with pytest.raises(ValueError, match="unknown role"):
        acl.rules("root", "pw")
    with pytest.raises(ValueError, match="needs a password"):
        acl.rules("worker", "")
    rules = acl.rules("worker", "pw")
    assert rules[:3] == ["reset", "on", ">pw"] and "-@admin" in rules and "-@dangerous" in rules


def test_acl_command_reads_passwords_from_env_and_files(redis_url, tmp_path, monkeypatch, capsys):
    """Kills the mutant without `acl.apply`'s ConfigError for a failed ACL SAVE (the ResponseError
    escapes as a traceback), which this test used to accept as well."""
    admin = _client(redis_url)
    try:
        for role in acl.ROLES:
            monkeypatch.delenv(f"DILOCO_{role.upper()}_REDIS_PASSWORD", raising=False)
            monkeypatch.delenv(f"DILOCO_{role.upper()}_REDIS_PASSWORD_FILE", raising=False)
        assert main(["acl", "--redis-url", redis_url]) == 2  # no passwords at all
        assert "DILOCO_WORKER_REDIS_PASSWORD" in capsys.readouterr().err

        passwords = {role: secrets.token_hex(12) for role in acl.ROLES}
        monkeypatch.setenv("DILOCO_WORKER_REDIS_PASSWORD", passwords["worker"])
        monkeypatch.setenv("DILOCO_AGGREGATOR_REDIS_PASSWORD", passwords["aggregator"])
        secret_file = tmp_path / "evaluator.pw"  # as a compose or Kubernetes secret is mounted
        secret_file.write_text(passwords["evaluator"] + "\n")
        monkeypatch.setenv("DILOCO_EVALUATOR_REDIS_PASSWORD_FILE", str(secret_file))
        assert main(["acl", "--redis-url", redis_url]) == 0
        out, err = capsys.readouterr()
        assert "Redis users ready: aggregator, evaluator, worker" in out
        assert not any(pw in out + err for pw in passwords.values()), "a password was printed"
        netloc = urlsplit(redis_url).netloc
        for role, password in passwords.items():
            assert _client(f"redis://{role}:{password}@{netloc}/0").acl_whoami() == role

        # --save needs a server started with --aclfile; the test server has none: a usage error that
        # says what to do, not a traceback
        assert main(["acl", "--redis-url", redis_url, "--save"]) == 2
        err = capsys.readouterr().err
        assert "ACL SAVE failed" in err and "--aclfile" in err, err
    finally:
        admin.acl_deluser(*acl.ROLES)


def test_rotating_a_password_locks_out_the_old_one(redis_url, users):
    admin = _client(redis_url)
    old = urlsplit(users["worker"])
    assert _client(users["worker"]).acl_whoami() == "worker"
    acl.apply(admin, {"worker": "a-new-worker-password"})
    with pytest.raises(redis.AuthenticationError):
        _client(users["worker"]).ping()
    assert _client(f"redis://worker:a-new-worker-password@{old.hostname}:{old.port}/0").acl_whoami() == "worker"


# ---- a real round under the role users ----

def test_worker_and_aggregator_run_a_round_under_their_users(redis_url, users, file_url):
    """Kills the mutant that declares the `done` bitmaps in KEYS again (`claim_units(keys=ks + done)`):
    the worker user gets NOPERM, which this test used to turn into an XFAIL."""
    cfg = harness.init(redis_url, file_url)  # the admin creates the run, as compose's init does
    agg = harness.aggregator(users["aggregator"], file_url, max_rounds=1)
    worker = harness.worker(users["worker"], file_url, "w0", max_rounds=1)
    try:
        assert worker.result(120) == 1
    except BaseException:
        agg.service.stop()  # it would wait for the delta until the round times out
        raise
    assert agg.result(120) == 1

    admin = _client(redis_url)
    head = read_head(admin, RUN)
    assert head.version == 1
    [(_, entry)] = admin.xrange(keys.versions(RUN))
    assert entry["participants"] == "w0"
    # the worker claimed its units, the commit marked them done
    n_units = units.units_per_round(cfg)
    assert admin.bitcount(keys.units_done(RUN, cfg.dataset_id, 0)) == n_units
    assert admin.bitcount(keys.units_claimed(RUN, cfg.dataset_id, 0)) == n_units
    # it heartbeat, uploaded its delta shards to the store and announced them
    stats = admin.hgetall(keys.worker_stats(RUN, "w0"))
    assert int(stats["heartbeat_ms"]) > 0 and stats["state"] == "stopped"
    [(_, ann)] = admin.xrange(keys.deltas(RUN))
    assert ann["worker"] == "w0"
    shards = list(Path(urlsplit(file_url).path, keys.delta_prefix(RUN, 0, "w0")).iterdir())
    assert shards and all(p.stat().st_size > 0 for p in shards)
    # and the new weights are there
    assert runs.load_weights(open_store(file_url), head)


# ---- what the worker's credentials cannot do ----

def test_worker_credentials_cannot_commit_or_mark_units_done(redis_url, users, file_url):
    cfg = harness.init(redis_url, file_url)
    admin, raw_admin = _client(redis_url), _client(redis_url, decode=False)
    aggregator = _client(users["aggregator"])
    token = Scripts(aggregator).acquire_lock(RUN, "agg", 60_000)
    assert token > 0
    # units leased to w0 (the admin claims them: a worker's claim has its own test above)
    claimed = Scripts(admin).claim_units(RUN, cfg.dataset_id, 0, 0, 3, "w0", 600_000)
    assert claimed and all(e == 0 for e, _ in claimed)
    head = read_head(admin, RUN)

    worker = _client(users["worker"])
    lock_value = worker.get(keys.lock(RUN))  # a worker can read all an aggregator knows...
    assert lock_value == f"{token}:agg" and read_head(worker, RUN) == head
    done = keys.units_done(RUN, cfg.dataset_id, 0)
    commit = {"lock_value": lock_value, "base_version": 0, "token": token,
              "weights": (head.weights, head.weights_digest), "momentum": (head.momentum, head.momentum_digest),
              "stats": {"n": "1", "participants": "w0"}, "dataset": cfg.dataset_id,
              "units": {0: [(bit, "w0") for _, bit in claimed]}}
    before = _dump(raw_admin, RUN)

    # ...but cannot write what only the aggregator writes
    attempts = {
        "commit script": lambda: Scripts(worker).commit(RUN, **commit),
        "HSET head": lambda: worker.hset(keys.head(RUN), "version", "1"),
        "SET lock": lambda: worker.set(keys.lock(RUN), "99:w0"),
        "DEL lock": lambda: worker.delete(keys.lock(RUN)),
        "INCR lock token": lambda: worker.incr(keys.lock_token(RUN)),
        "XADD versions": lambda: worker.xadd(keys.versions(RUN), {"version": "1"}),
        "SETBIT done": lambda: worker.setbit(done, claimed[0][1], 1),
        "HSET config": lambda: worker.hset(keys.config(RUN), "outer_lr", "9.0"),
        "HSET control": lambda: worker.hset(keys.control(RUN), "state", "stopped"),
        "XADD rejections": lambda: worker.xadd(keys.rejections(RUN), {"worker": "w1"}),
        "HSET eval": lambda: worker.hset(keys.eval_losses(RUN), "0", "0.1"),
        "XADD audit": lambda: worker.xadd(keys.audit(RUN), {"who": "w0"}),
        "FLUSHALL": lambda: worker.flushall(),
        "ACL SETUSER": lambda: worker.acl_setuser("worker", enabled=True, keys=["*"], commands=["+@all"]),
        "CONFIG SET": lambda: worker.config_set("appendonly", "no"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(NoPermissionError):
            attempt()
            pytest.fail(f"the worker user could {what}")
    # a script declaring only keys the worker may write is still checked command by command inside
    sneaky = "return redis.call('HSET', ARGV[1], 'version', '1')"
    with pytest.raises(redis.ResponseError, match=r"NOPERM|can't access|no permissions"):
        worker.eval(sneaky, 1, keys.worker_stats(RUN, "w0"), keys.head(RUN))
    assert _dump(raw_admin, RUN) == before, "a refused write changed something"

    # the aggregator's credentials commit the very same thing: the arguments were valid
    assert Scripts(aggregator).commit(RUN, **commit) == 1
    assert admin.getbit(done, claimed[0][1]) == 1 and read_head(admin, RUN).version == 1


def test_worker_may_write_its_own_keys(redis_url, users, file_url):
    cfg = harness.init(redis_url, file_url)
    worker = _client(users["worker"])
    worker.xadd(keys.deltas(RUN), {"worker": "w0"})  # write-only: announce...
    assert worker.hset(keys.worker_stats(RUN, "w0"), "step", "1") == 1
    assert worker.sadd(keys.workers(RUN), "w0") == 1
    assert worker.set(keys.worker_alive(RUN, "w0"), "nonce", px=10_000)
    assert worker.hset(keys.units_meta(RUN, cfg.dataset_id), "epoch_hi", "0") == 0
    assert worker.setbit(keys.units_claimed(RUN, cfg.dataset_id, 0), 3, 1) == 0
    assert worker.hgetall(keys.config(RUN))["run"] == RUN  # ...and read the run
    assert worker.xrange(keys.deltas(RUN))


def test_evaluator_writes_eval_but_not_head(redis_url, users, file_url):
    cfg = harness.init(redis_url, file_url)
    admin = _client(redis_url)
    evaluator = _client(users["evaluator"])
    head = read_head(evaluator, RUN)
    assert evaluator.hset(keys.eval_losses(RUN), "0", "2.5") == 1
    refused = {
        "HSET head": lambda: evaluator.hset(keys.head(RUN), "version", "1"),
        "XADD versions": lambda: evaluator.xadd(keys.versions(RUN), {"version": "1"}),
        "XADD deltas": lambda: evaluator.xadd(keys.deltas(RUN), {"worker": "ev"}),
        "SET lock": lambda: evaluator.set(keys.lock(RUN), "1:ev"),
        "SETBIT done": lambda: evaluator.setbit(keys.units_done(RUN, cfg.dataset_id, 0), 0, 1),
        "HSET config": lambda: evaluator.hset(keys.config(RUN), "outer_lr", "9.0"),
        "HSET units": lambda: evaluator.hset(keys.units_meta(RUN, cfg.dataset_id), "epoch_lo", "5"),
    }
    for what, attempt in refused.items():
        with pytest.raises(NoPermissionError):
            attempt()
            pytest.fail(f"the evaluator user could {what}")
    assert read_head(admin, RUN) == head
    # what the monitor reads (it runs as the evaluator user): the whole status snapshot
    snap = snapshot(evaluator, RUN)
    assert snap["version"] == 0 and snap["eval"] == {0: 2.5}


def test_every_role_reads_but_only_its_own_run_keys(redis_url, users):
    admin = _client(redis_url)
    admin.set("unrelated", "x")
    for role, url in users.items():
        client = _client(url)
        with pytest.raises(NoPermissionError):
            client.get("unrelated")  # keys outside diloco:{run}:* are out of reach
            pytest.fail(f"{role} read a key outside diloco:{{run}}:*")
        assert client.exists(keys.config(RUN)) == 0
