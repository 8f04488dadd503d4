"""compose.yaml, .env.example, deploy/ and the Dockerfile, checked without a Docker engine.

The file is parsed and interpolated the way `docker compose` does it (a small resolver for
`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `$VAR` and
`$$`), with values from .env.example plus test passwords. Every diloco service's command must parse
with the real CLI, and the services are then run, with the environment compose gives them, against
real servers: the redis service's start script with the local redis-server (admin password, ACL file,
password rotation), createbucket's script with a stand-in `mc` that records its calls, and the
redis-users, init, aggregator, worker, evaluator and monitor commands against the test session's
redis-server and S3 server, each diloco service under its own Redis ACL user. Only host names, the
bucket and the S3 credentials (moto does not enforce IAM policies, so the policies are checked
structurally instead) are swapped for the local ones.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from diloco import acl, keys
from diloco.cli import build_parser
from diloco.localserver import find_redis_server, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
POLICIES = ROOT / "deploy" / "minio"

# Every secret; .env.example leaves them empty and compose requires each with ${VAR:?message}.
REDIS_SECRETS = {"default": "REDIS_PASSWORD", "worker": "REDIS_WORKER_PASSWORD",
                 "aggregator": "REDIS_AGGREGATOR_PASSWORD", "evaluator": "REDIS_EVALUATOR_PASSWORD"}
MINIO_SECRETS = {"MINIO_ROOT_USER": "MINIO_ROOT_PASSWORD", "MINIO_WORKER_USER": "MINIO_WORKER_PASSWORD",
                 "MINIO_AGGREGATOR_USER": "MINIO_AGGREGATOR_PASSWORD"}
SECRETS = (*REDIS_SECRETS.values(), *MINIO_SECRETS.values())
# URL-safe and 8+ characters, as .env.example asks; distinct, so a test can tell where each one went
TEST_SECRETS = {name: name.lower().replace("_", "-") + "-test" for name in SECRETS}
# service -> the CLI subcommand it runs
DILOCO_SERVICES = {"redis-users": "acl", "init": "init", "aggregator": "aggregator", "worker": "worker",
                   "evaluator": "eval", "monitor": "monitor"}
EXPECTED_SERVICES = {"redis", "minio", "createbucket", *DILOCO_SERVICES}
# service -> (its Redis user, the variable naming its MinIO user, or None: no object-store access)
ROLES = {"redis-users": ("default", None), "init": ("default", "MINIO_AGGREGATOR_USER"),
         "aggregator": ("aggregator", "MINIO_AGGREGATOR_USER"), "worker": ("worker", "MINIO_WORKER_USER"),
         "evaluator": ("evaluator", "MINIO_WORKER_USER"), "monitor": ("evaluator", None)}
STORE_PREFIX = "diloco"  # compose's DILOCO_STORE is s3://${BUCKET}/diloco; the policies name this prefix


# ---- a compose-style interpolation resolver ----

class InterpolationError(ValueError):
    pass


# The same alternatives as compose-go's template pattern: "$$", "$NAME", "${...}", and else invalid.
_DOLLAR = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[_A-Za-z][_A-Za-z0-9]*)|\{(?P<braced>[^}]*)\}"
                     r"|(?P<invalid>))")
_BRACED = re.compile(r"(?P<name>[_A-Za-z][_A-Za-z0-9]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>.*))?", re.S)


def _parse_braced(body: str, text: str) -> tuple[str, str | None, str]:
    m = _BRACED.fullmatch(body)
    if m is None or "${" in body:  # nested substitutions are not used here, so not supported
        raise InterpolationError(f"invalid interpolation ${{{body}}} in {text!r}")
    return m["name"], m["op"], m["arg"] or ""


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with every substitution resolved from `env`, as compose would resolve it."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        if m["braced"] is None:
            raise InterpolationError(f"invalid interpolation at {text[m.start():m.start() + 12]!r} "
                                     f"in {text!r} (a literal $ is written $$)")
        name, op, arg = _parse_braced(m["braced"], text)
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return interpolate(arg, env) if missing else value
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value
        return value or ""

    return _DOLLAR.sub(sub, text)


def references(text: str) -> list[tuple[str, str | None]]:
    """(name, operator) for each variable `text` refers to; `$$` is not a reference."""
    out = []
    for m in _DOLLAR.finditer(text):
        if m["named"]:
            out.append((m["named"], None))
        elif m["braced"] is not None:
            name, op, _ = _parse_braced(m["braced"], text)
            out.append((name, op))
    return out


def strings(obj: Any):
    """Every string value in a parsed YAML document (mapping keys are not interpolated)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def resolve(obj: Any, env: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, dict):
        return {k: resolve(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, env) for v in obj]
    return obj


def read_dotenv(path: Path) -> dict[str, str]:
    out = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[_A-Za-z][_A-Za-z0-9]*", key), \
            f"{path.name}:{n}: not KEY=VALUE: {raw!r}"
        assert key not in out, f"{path.name}:{n}: {key} is set twice"
        out[key] = value
    return out


# ---- fixtures ----

@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return read_dotenv(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def services(raw, dotenv) -> dict[str, dict[str, Any]]:
    """The services as compose would run them with .env.example plus the test passwords."""
    return resolve(raw, {**dotenv, **TEST_SECRETS})["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert isinstance(cmd, list), f"use the list form for commands, got {cmd!r}"
    return [str(c) for c in cmd]


# ---- the resolver itself ----

@pytest.mark.parametrize(("text", "expected"), [
    ("a $$b $${C}", "a $b ${C}"),
    ("${SET}/${EMPTY}/${UNSET}", "x//"),
    ("$SET-$UNSET.", "x-."),
    ("${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET:-d}", "d  d x"),
    ("${UNSET:-$SET} ${UNSET:-$$}", "x $"),
    ("${EMPTY?msg}", ""),
])
def test_resolver(text, expected):
    assert interpolate(text, {"SET": "x", "EMPTY": ""}) == expected


@pytest.mark.parametrize(("text", "error"), [
    ("${UNSET:?set it please}", "UNSET is missing a value: set it please"),
    ("${EMPTY:?no}", "EMPTY"),
    ("${UNSET?no}", "UNSET"),
    ("cost: 5$", "invalid interpolation"),
    ("${1BAD}", "invalid interpolation"),
    ("${A:+x}", "invalid interpolation"),
])
def test_resolver_errors(text, error):
    with pytest.raises(InterpolationError, match=re.escape(error)):
        interpolate(text, {"EMPTY": ""})


def _host_path(svc: dict[str, Any], container_path: str) -> Path:
    """The file in this repository that a bind mount of `svc` puts at `container_path`."""
    for volume in svc.get("volumes") or []:
        host, _, rest = volume.partition(":")
        target = rest.split(":")[0]
        if host.startswith("./") and (container_path == target or container_path.startswith(target + "/")):
            return ROOT / host[2:] / container_path[len(target):].lstrip("/")
    pytest.fail(f"no bind mount from this repository provides {container_path}: {svc.get('volumes')}")


# ---- variables ----

def test_every_variable_is_documented_or_defaulted(raw, dotenv):
    refs = {(name, op) for s in strings(raw) for name, op in references(s)}
    undefined = sorted({name for name, op in refs if op not in (":-", "-") and name not in dotenv})
    assert not undefined, \
        f"compose.yaml uses variables without a default that .env.example lacks: {undefined}"
    unused = sorted(set(dotenv) - {name for name, _ in refs})
    assert not unused, f".env.example sets variables compose.yaml never uses: {unused}"


def test_defaults_agree_with_env_example(raw, dotenv):
    """A `${VAR:-default}` in compose.yaml and VAR in .env.example must not disagree."""
    for s in strings(raw):
        for m in re.finditer(r"\$\{([A-Z_]+):-([^}]*)\}", s):
            if m[1] in dotenv:
                assert dotenv[m[1]] == m[2], f"{m[1]}: .env.example has {dotenv[m[1]]!r}, compose.yaml {m[2]!r}"


def test_secrets_are_required_everywhere(raw, dotenv):
    ops: dict[str, set] = {}
    for s in strings(raw):
        for name, op in references(s):
            ops.setdefault(name, set()).add(op)
    for secret in SECRETS:
        assert ops.get(secret) == {":?"}, f"every use of {secret} must be ${{{secret}:?message}}"
        # .env.example ships them empty, so `cp .env.example .env` alone cannot start the stack
        assert dotenv.get(secret) == "", f".env.example must leave {secret} empty"
        with pytest.raises(InterpolationError, match=secret):
            resolve(raw, {**dotenv, **TEST_SECRETS, secret: ""})
    resolve(raw, {**dotenv, **TEST_SECRETS})  # and with all set, everything resolves


def test_every_dollar_is_valid(raw):
    for s in strings(raw):
        references(s)  # raises on `${...}` forms compose would reject
        interpolate(s, dict.fromkeys(SECRETS, "x"))  # raises on a lone `$`


# ---- structure ----

def test_services_and_replicas(services, dotenv):
    assert set(services) >= EXPECTED_SERVICES, f"missing services: {EXPECTED_SERVICES - set(services)}"
    worker, agg = services["worker"], services["aggregator"]
    assert int(worker["deploy"]["replicas"]) == int(dotenv["WORKERS"]) >= 1
    assert int(agg["deploy"]["replicas"]) == 2
    for name in ("worker", "aggregator"):
        # replicas need distinct names and must not fight over a host port
        assert "container_name" not in services[name], name
        assert "hostname" not in services[name], f"{name}: a fixed hostname gives replicas one id"
    for name, svc in services.items():
        assert not svc.get("ports"), f"{name} publishes host ports; services talk over the compose network"
    assert "DILOCO_WORKER_ID" not in env_of(worker), "workers must default to their unique host names"
    assert services["monitor"].get("profiles") == ["monitor"]
    for one_shot in ("redis-users", "createbucket", "init"):
        assert services[one_shot].get("restart", "no") == "no", one_shot
    for long_running in ("redis", "minio", "aggregator", "worker", "evaluator"):
        assert services[long_running].get("restart") == "unless-stopped", long_running


@pytest.mark.parametrize(("service", "repo"), [("minio", "minio/minio"), ("createbucket", "minio/mc")])
def test_minio_images_pinned(raw, service, repo):
    image = raw["services"][service]["image"]
    name, _, tag = image.rpartition(":")
    assert name == repo, image
    assert tag.startswith("RELEASE.") and tag != "latest", f"{service}: pin a release tag, not {image!r}"


def test_redis(services):
    redis_svc = services["redis"]
    name, _, tag = redis_svc["image"].rpartition(":")
    assert name == "redis" and re.fullmatch(r"\d+\.\d+(\.\d+)?", tag), f"pin a redis version: {redis_svc['image']}"
    cmd = command_of(redis_svc)
    assert cmd[0] == "sh" and _host_path(redis_svc, cmd[1]) == ROOT / "deploy" / "redis" / "start.sh"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] == "always"
    # redis-server ignores --requirepass once it has an --aclfile: the start script sets the password
    assert "--requirepass" not in cmd, "with an ACL file, --requirepass is ignored; start.sh sets the password"
    env = env_of(redis_svc)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == TEST_SECRETS["REDIS_PASSWORD"]
    assert env["REDIS_ACL_FILE"].startswith("/data/"), "the ACL file must live on the data volume"
    assert any(v.endswith(":/data") for v in redis_svc["volumes"])
    test = " ".join(redis_svc["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test and "$REDIS_PASSWORD" in test


def test_minio_and_bucket(services):
    minio, mc = services["minio"], services["createbucket"]
    assert command_of(minio)[:2] == ["server", "/data"]
    assert "curl" not in " ".join(minio["healthcheck"]["test"]), "recent MinIO images have no curl"
    assert any(v.endswith(":/data") for v in minio["volumes"])
    entry = mc["entrypoint"]
    assert entry[0] == "/bin/bash" and _host_path(mc, entry[1]) == POLICIES / "setup.sh"
    for name in ("worker-policy.json", "aggregator-policy.json"):  # mounted next to the script
        assert _host_path(mc, str(Path(entry[1]).parent / name)).is_file()
    env = env_of(mc)
    assert env["MINIO_ROOT_USER"] == env_of(minio)["MINIO_ROOT_USER"]
    assert env["MINIO_ROOT_PASSWORD"] == env_of(minio)["MINIO_ROOT_PASSWORD"]
    for user, password in MINIO_SECRETS.items():
        assert env[password] == TEST_SECRETS[password] and env[user], user


def test_depends_on(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on a missing service {target!r}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), \
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", \
                    f"{name} waits for {target} to complete, but {target} restarts"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition!r}"

    def waits_for(name: str, target: str, condition: str) -> bool:
        return (services[name].get("depends_on") or {}).get(target, {}).get("condition") == condition

    assert waits_for("redis-users", "redis", "service_healthy")
    assert waits_for("createbucket", "minio", "service_healthy")
    for target in ("redis-users", "createbucket"):
        assert waits_for("init", target, "service_completed_successfully"), target
    for name in ("aggregator", "worker", "evaluator"):  # their Redis users and their run must exist
        for target in ("redis-users", "init"):
            assert waits_for(name, target, "service_completed_successfully"), (name, target)
    assert waits_for("monitor", "redis-users", "service_completed_successfully")


def test_each_service_gets_only_its_own_credentials(services):
    buckets = env_of(services["createbucket"])
    bucket = buckets["BUCKET"]
    for name, (redis_user, minio_user) in ROLES.items():
        svc = services[name]
        assert svc["image"] == "diloco:latest" and svc["build"]["context"] == ".", name
        env = env_of(svc)
        assert env["DILOCO_RUN"] and env["DILOCO_LOG_LEVEL"], name
        url = urlsplit(env["DILOCO_REDIS_URL"])
        assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0"), name
        assert (url.username, url.password) == (redis_user, TEST_SECRETS[REDIS_SECRETS[redis_user]]), name
        if minio_user is None:
            assert not {k for k in env if k.startswith(("AWS_", "DILOCO_S3", "DILOCO_STORE"))}, \
                f"{name} needs no object store: give it no credentials"
        else:
            store = urlsplit(env["DILOCO_STORE"])
            assert (store.scheme, store.netloc, store.path) == ("s3", bucket, "/" + STORE_PREFIX), name
            endpoint = urlsplit(env["DILOCO_S3_ENDPOINT"])
            assert (endpoint.hostname, endpoint.port) == ("minio", 9000), name
            assert env["AWS_ACCESS_KEY_ID"] == buckets[minio_user], name
            assert env["AWS_SECRET_ACCESS_KEY"] == TEST_SECRETS[MINIO_SECRETS[minio_user]], name
        # no other secret reaches the service, in any variable
        own = {TEST_SECRETS[REDIS_SECRETS[redis_user]]}
        if minio_user:
            own.add(TEST_SECRETS[MINIO_SECRETS[minio_user]])
        if name == "redis-users":
            own |= {TEST_SECRETS[REDIS_SECRETS[r]] for r in acl.ROLES}
        leaked = {s for s in TEST_SECRETS.values() for v in env.values() if s in v} - own
        assert not leaked, f"{name} gets secrets it does not need: {leaked}"
    # redis-users hands each role its password under the names `diloco acl` reads
    env = env_of(services["redis-users"])
    for role in acl.ROLES:
        assert env[f"DILOCO_{role.upper()}_REDIS_PASSWORD"] == TEST_SECRETS[REDIS_SECRETS[role]], role
    assert command_of(services["redis-users"]) == ["acl", "--save"], "passwords never go on the command line"
    assert env_of(services["worker"])["DILOCO_DEVICE"]


@pytest.mark.parametrize("service", sorted(DILOCO_SERVICES))
def test_commands_parse_with_the_cli(services, service):
    cmd = command_of(services[service])
    try:
        args = build_parser().parse_args(cmd)
    except SystemExit:
        pytest.fail(f"`diloco {' '.join(cmd)}` (service {service}) is not a valid diloco command")
    assert args.command == DILOCO_SERVICES[service]


def test_dockerfile():
    text = DOCKERFILE.read_text()
    entry = re.search(r"^ENTRYPOINT\s+(.+)$", text, re.M)
    assert entry and json.loads(entry[1]) == ["diloco"], "compose commands are arguments to `diloco`"
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M), "run as a non-root user"
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    assert pinned and pinned[1] == version("torch").split("+")[0], \
        "the image's torch should be the version the tests run with"
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    ignored = set(DOCKERIGNORE.read_text().split())
    assert {".git", ".venv", ".env", "**/__pycache__", "diloco-data"} <= ignored


# ---- the object-store policies ----

def _policy(name: str, bucket: str) -> dict[str, Any]:
    """deploy/minio/NAME with ${BUCKET} filled in, as setup.sh does."""
    return json.loads((POLICIES / name).read_text().replace("${BUCKET}", bucket))


def _allows(policy: dict[str, Any], action: str, resource: str, prefix: str | None = None) -> bool:
    """IAM evaluation for Allow statements (the files have no Deny): action, resource glob, s3:prefix."""
    for st in policy["Statement"]:
        if action not in st["Action"] or not any(fnmatch.fnmatchcase(resource, r) for r in st["Resource"]):
            continue
        cond = st.get("Condition")
        if cond is None:
            return True
        assert set(cond) == {"StringLike"} and set(cond["StringLike"]) == {"s3:prefix"}, cond
        if prefix is not None and any(fnmatch.fnmatchcase(prefix, p) for p in cond["StringLike"]["s3:prefix"]):
            return True
    return False


def test_policy_files_are_well_formed():
    for name in ("worker-policy.json", "aggregator-policy.json"):
        text = (POLICIES / name).read_text()
        policy = json.loads(text)
        assert policy["Version"] == "2012-10-17"
        for st in policy["Statement"]:
            assert st["Effect"] == "Allow", name
            assert all(a.startswith("s3:") and "*" not in a for a in st["Action"]), f"{name}: no wildcard actions"
            # every resource is in the one bucket, named by the placeholder setup.sh fills in
            assert all(r == "arn:aws:s3:::${BUCKET}" or r.startswith(f"arn:aws:s3:::${{BUCKET}}/{STORE_PREFIX}/")
                       for r in st["Resource"]), (name, st["Resource"])
        assert "${" not in text.replace("${BUCKET}", ""), f"{name}: setup.sh fills in only ${{BUCKET}}"


@pytest.mark.parametrize("bucket", ["diloco", "team-bucket.2"])
def test_worker_policy(bucket):
    p = _policy("worker-policy.json", bucket)
    arn = f"arn:aws:s3:::{bucket}"

    def obj(key: str) -> str:
        return f"{arn}/{STORE_PREFIX}/{key}"

    delta = obj(keys.delta_shard("r1", 7, "gpu-07", "abc123", 0))
    written_by_others = [obj(keys.weights_object("r1", 8, 3)), obj(keys.momentum_object("r1", 8, 3)),
                         obj(keys.snapshot_object("r1", 8)),
                         f"{arn}/other/runs/r1/deltas/x", f"arn:aws:s3:::other/{STORE_PREFIX}/runs/r1/deltas/x"]
    assert _allows(p, "s3:PutObject", delta)
    # IAM's * also matches '/', so runs/a/b/deltas/c is writable too; no key the services read has that
    # shape, since run names have no '/' (keys.check_name), and shards are verified by sha256 anyway.
    for resource in written_by_others:
        assert not _allows(p, "s3:PutObject", resource), resource
    for resource in (delta, obj(keys.weights_object("r1", 8, 3)), obj(keys.momentum_object("r1", 8, 3))):
        assert _allows(p, "s3:GetObject", resource), resource
        assert not _allows(p, "s3:DeleteObject", resource), resource
    assert not _allows(p, "s3:GetObject", f"{arn}/other/key")
    assert _allows(p, "s3:ListBucket", arn, prefix=f"{STORE_PREFIX}/runs/r1/weights/")
    assert not _allows(p, "s3:ListBucket", arn, prefix="other/")
    assert not _allows(p, "s3:ListBucket", arn)  # no prefix: the whole bucket
    assert _allows(p, "s3:HeadBucket", arn)  # the services' startup check (S3Store.check)
    # ...and nothing else
    granted = {(a, r) for st in p["Statement"] for a in st["Action"] for r in st["Resource"]}
    assert granted == {("s3:PutObject", f"{arn}/{STORE_PREFIX}/runs/*/deltas/*"),
                       ("s3:GetObject", f"{arn}/{STORE_PREFIX}/runs/*"),
                       ("s3:ListBucket", arn), ("s3:HeadBucket", arn)}


@pytest.mark.parametrize("bucket", ["diloco", "team-bucket.2"])
def test_aggregator_policy(bucket):
    p = _policy("aggregator-policy.json", bucket)
    arn = f"arn:aws:s3:::{bucket}"
    ours = [keys.weights_object("r1", 8, 3), keys.momentum_object("r1", 8, 3), keys.snapshot_object("r1", 8),
            keys.delta_shard("r1", 7, "gpu-07", "abc123", 0)]
    for key in ours:
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert _allows(p, action, f"{arn}/{STORE_PREFIX}/{key}"), (action, key)
            assert not _allows(p, action, f"{arn}/other/{key}"), (action, key)
            assert not _allows(p, action, f"arn:aws:s3:::other/{STORE_PREFIX}/{key}"), (action, key)
    assert _allows(p, "s3:ListBucket", arn, prefix=f"{STORE_PREFIX}/runs/r1/state/")
    assert not _allows(p, "s3:ListBucket", arn, prefix="other/")
    assert _allows(p, "s3:HeadBucket", arn)
    granted = {(a, r) for st in p["Statement"] for a in st["Action"] for r in st["Resource"]}
    assert granted == {(a, f"{arn}/{STORE_PREFIX}/*") for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject")} \
        | {("s3:ListBucket", arn), ("s3:HeadBucket", arn)}


# ---- createbucket's script, with a stand-in for mc ----

FAKE_MC = r"""#!/bin/sh
# A stand-in for MinIO's mc: records each call, keeps the policy files it is given, and refuses a
# second attach of the same policy the way mc does.
printf '%s\n' "$*" >> "$MC_STATE/calls"
if [ "$1 $2 $3" = "${MC_FAIL:-}" ]; then echo "mc: <ERROR> something else went wrong" >&2; exit 1; fi
case "$1 $2 $3" in
"admin policy create") cp "$6" "$MC_STATE/policy-$5.json" ;;
"admin policy attach")
    mark="$MC_STATE/attached-$5-$7"
    if [ -e "$mark" ]; then
        printf '%s %s\n' "mc: <ERROR> Unable to make user/group policy association." \
            "The specified policy change is already in effect." >&2
        exit 1
    fi
    : > "$mark"
    echo "Attached Policies: [$5]" ;;
esac
"""


def _run_setup(services, tmp_path: Path, **overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    mc = services["createbucket"]
    state = tmp_path / "mc-state"
    state.mkdir(exist_ok=True)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "mc").write_text(FAKE_MC)
    (bindir / "mc").chmod(0o755)
    env = {**env_of(mc), **overrides, "MC_STATE": str(state), "TMPDIR": str(tmp_path),
           "PATH": f"{bindir}:{os.environ['PATH']}"}
    entry = mc["entrypoint"]
    proc = subprocess.run([entry[0].rsplit("/", 1)[-1], str(_host_path(mc, entry[1]))], env=env, text=True,
                          capture_output=True, timeout=60)
    return proc, state


def test_createbucket_script(services, tmp_path):
    env = env_of(services["createbucket"])
    bucket = env["BUCKET"]
    first, state = _run_setup(services, tmp_path)
    assert first.returncode == 0, first.stderr
    second, _ = _run_setup(services, tmp_path)  # every `docker compose up` runs it again
    assert second.returncode == 0, second.stderr
    calls = (state / "calls").read_text().splitlines()
    root = f"alias set minio http://minio:9000 {env['MINIO_ROOT_USER']} {env['MINIO_ROOT_PASSWORD']}"
    assert calls[:2] == [root, f"mb --ignore-existing minio/{bucket}"]
    for role in ("worker", "aggregator"):
        user = env[f"MINIO_{role.upper()}_USER"]
        policy = f"diloco-{role}"
        assert f"admin user add minio {user} {env[f'MINIO_{role.upper()}_PASSWORD']}" in calls
        assert calls.count(f"admin policy attach minio {policy} --user {user}") == 2
        assert any(c.startswith(f"admin policy create minio {policy} ") for c in calls)
        assert json.loads((state / f"policy-{policy}.json").read_text()) == _policy(f"{role}-policy.json", bucket)
    assert len(calls) == 2 * 8
    for out in (first, second):  # the script prints no secret
        for secret in TEST_SECRETS.values():
            assert secret not in out.stdout + out.stderr


def test_createbucket_script_templates_any_bucket(services, tmp_path):
    proc, state = _run_setup(services, tmp_path, BUCKET="team-bucket.2")
    assert proc.returncode == 0, proc.stderr
    for role in ("worker", "aggregator"):
        text = (state / f"policy-diloco-{role}.json").read_text()
        assert "arn:aws:s3:::team-bucket.2/diloco/" in text and "${BUCKET}" not in text


@pytest.mark.parametrize(("overrides", "error"), [
    ({"BUCKET": "Bad_Bucket"}, "not a valid bucket name"),
    ({"MINIO_WORKER_USER": "diloco"}, "differ from MINIO_ROOT_USER"),  # .env.example's root user
    ({"MINIO_AGGREGATOR_PASSWORD": "short"}, "at least 8 characters"),
    ({"MINIO_WORKER_PASSWORD": ""}, "MINIO_WORKER_PASSWORD"),
    ({"MC_FAIL": "admin policy attach"}, "something else went wrong"),
])
def test_createbucket_script_fails_loudly(services, tmp_path, overrides, error):
    proc, _ = _run_setup(services, tmp_path, **overrides)
    assert proc.returncode != 0 and error in proc.stderr, (proc.returncode, proc.stderr)


# ---- the redis service's start script, with the local redis-server ----

class _ComposeRedis:
    """The redis service's command and environment, run locally (the image's entrypoint is a shim)."""

    def __init__(self, svc: dict[str, Any], tmp_path: Path) -> None:
        self.svc, self.dir, self.port = svc, tmp_path, free_port()
        self.acl_file = tmp_path / "users.acl"
        self.bindir = tmp_path / "bin"
        self.bindir.mkdir()
        shim = self.bindir / "docker-entrypoint.sh"  # the image's: chown /data, drop root, exec "$@"
        shim.write_text('#!/bin/sh\nexec "$@"\n')
        shim.chmod(0o755)
        (self.bindir / "redis-server").symlink_to(find_redis_server())
        self.proc: subprocess.Popen | None = None

    def start(self, password: str) -> None:
        cmd = command_of(self.svc)
        env = {**os.environ, **env_of(self.svc), "REDIS_PASSWORD": password, "REDISCLI_AUTH": password,
               "REDIS_ACL_FILE": str(self.acl_file), "PATH": f"{self.bindir}:{os.environ['PATH']}"}
        local = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                 "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen([cmd[0], str(_host_path(self.svc, cmd[1])), *cmd[2:], *local], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        client = self.client(password=password)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                log = self.dir / "redis.log"
                pytest.fail(f"the redis start script exited {self.proc.returncode}: {out}"
                            f"{log.read_text()[-2000:] if log.exists() else ''}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail("redis-server did not answer within 20 s")
                time.sleep(0.05)  # startup has no event to wait on

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **kw)

    def url(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def stop(self, password: str) -> None:
        with contextlib.suppress(redis.ConnectionError):  # SHUTDOWN closes the connection
            self.client(password=password).shutdown()
        assert self.proc is not None
        self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_redis_start_script_admin_password_acl_file_and_rotation(services, tmp_path):
    server = _ComposeRedis(services["redis"], tmp_path)
    first, rotated = TEST_SECRETS["REDIS_PASSWORD"], "rotated-admin-pw"
    try:
        server.start(first)
        # the default user needs the password, though --aclfile makes redis-server ignore --requirepass
        with pytest.raises(redis.AuthenticationError):
            server.client().ping()
        with pytest.raises(redis.AuthenticationError):
            server.client(password="wrong").ping()
        admin = server.client(password=first)
        assert admin.config_get("appendonly") == {"appendonly": "yes"}
        assert admin.config_get("appendfsync") == {"appendfsync": "always"}
        assert admin.config_get("aclfile") == {"aclfile": str(server.acl_file)}

        # the healthcheck, pointed at this port: PONG with the password, a failure without it
        check = services["redis"]["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {server.port}")
        for password, rc in ((first, 0), ("wrong", 1)):
            proc = subprocess.run(["sh", "-c", check], env={**os.environ, "REDIS_PASSWORD": password},
                                  capture_output=True, timeout=30)
            assert proc.returncode == rc, proc

        # redis-users, as compose runs it: creates the role users and saves them to the file
        users = services["redis-users"]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("DILOCO_")}, **env_of(users),
               "DILOCO_REDIS_URL": server.url("default", first)}
        proc = subprocess.run([sys.executable, "-m", "diloco", *command_of(users)], env=env, text=True,
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        for secret in TEST_SECRETS.values():
            assert secret not in proc.stdout + proc.stderr, "a password was printed"
        saved = server.acl_file.read_text()
        assert {line.split()[1] for line in saved.splitlines()} == {"default", *acl.ROLES}
        for secret in TEST_SECRETS.values():
            assert secret not in saved, "the ACL file holds hashes, never passwords"
        server.stop(first)

        # restart with a new admin password: it is in force, the old one is not, the roles survive
        server.start(rotated)
        with pytest.raises(redis.AuthenticationError):
            server.client(password=first).ping()
        for role in acl.ROLES:
            client = redis.Redis.from_url(server.url(role, TEST_SECRETS[REDIS_SECRETS[role]]), decode_responses=True)
            assert client.acl_whoami() == role
        lines = server.acl_file.read_text().splitlines()
        assert sum(line.startswith("user default ") for line in lines) == 1
        server.stop(rotated)
    finally:
        server.kill()


# ---- the diloco commands, run against real services ----

def _local_env(svc: dict[str, Any], redis_url: str, s3_endpoint: str, bucket: str) -> dict[str, str]:
    """The service's compose environment with the compose hosts, bucket and S3 keys swapped for the test's.

    A role user keeps its name and password (the test creates the users) on the test server's address;
    the admin URL becomes the test server's URL, which has no password. Nothing DILOCO_* or AWS_* leaks
    in from the test process, so a variable missing from compose makes the command fail here too."""
    env = env_of(svc)
    local = {"DILOCO_S3_ENDPOINT": s3_endpoint,
             "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],  # moto ignores IAM: root keys
             "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    if "DILOCO_REDIS_URL" in env:
        url, test = urlsplit(env["DILOCO_REDIS_URL"]), urlsplit(redis_url)
        if url.username in acl.ROLES:
            local["DILOCO_REDIS_URL"] = url._replace(netloc=f"{url.username}:{url.password}@{test.netloc}").geturl()
        else:
            local["DILOCO_REDIS_URL"] = redis_url
    if "DILOCO_STORE" in env:  # same prefix, the test's bucket
        local["DILOCO_STORE"] = urlsplit(env["DILOCO_STORE"])._replace(netloc=bucket).geturl()
    env.update({k: v for k, v in local.items() if k in env})  # what compose lacks stays missing
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DILOCO_", "AWS_"))}
    return {**base, **env}


def _diloco(*calls: tuple[list[str], dict[str, str]], cwd: Path) -> list[str]:
    """Run `diloco ARGS` for each (args, env) at once; their stdouts, once all exited 0."""
    procs = [(args, subprocess.Popen([sys.executable, "-m", "diloco", *args], env=env, cwd=cwd,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL))
             for args, env in calls]
    outs = []
    for args, proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 0, f"`diloco {' '.join(args)}` exited {proc.returncode}:\n{err[-3000:]}"
        outs.append(out)
    return outs


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def test_commands_run_against_real_services(raw, dotenv, redis_url, s3_server, s3_url, tmp_path):
    """Kills the mutant that declares the `done` bitmaps in KEYS again (`claim_units(keys=ks + done)`):
    the worker exits with NOPERM, which this test used to turn into an XFAIL."""
    # A tiny task, short rounds and one torch thread, set the way an operator would: in .env.
    settings = {**dotenv, **TEST_SECRETS, "TASK": "tiny", "SYNC_EVERY": "5", "WORKER_THREADS": "1",
                "EVAL_SAMPLES": "64"}
    services = resolve(raw, settings)["services"]
    bucket = urlsplit(s3_url).netloc
    env = {name: _local_env(services[name], redis_url, s3_server.endpoint, bucket) for name in DILOCO_SERVICES}
    cmd = {name: command_of(services[name]) for name in DILOCO_SERVICES}
    status_json = (["status", "--run", settings["RUN"], "--json"], env["monitor"])  # as the monitor's user
    run = settings["RUN"]
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # redis-users: the test server has no ACL file to save to (the start-script test saves)
        assert cmd["redis-users"][-1] == "--save"
        [out] = _diloco((cmd["redis-users"][:-1], env["redis-users"]), cwd=tmp_path)
        assert "Redis users ready: aggregator, evaluator, worker" in out
        for name in ("aggregator", "worker", "evaluator", "monitor"):  # each service is its role's user
            whoami = redis.Redis.from_url(env[name]["DILOCO_REDIS_URL"], decode_responses=True).acl_whoami()
            assert whoami == ROLES[name][0], name
        _run_services(cmd, env, status_json, run, tmp_path, s3_server, bucket)
    finally:
        admin.acl_deluser(*acl.ROLES)
        admin.close()


def _run_services(cmd, env, status_json, run, tmp_path, s3_server, bucket) -> None:
    [out] = _diloco((cmd["init"], env["init"]), cwd=tmp_path)
    assert f"run {run} created" in out

    # The aggregator, a worker and the evaluator for one round; meanwhile status, the monitor's one
    # frame, and init once more, as on every `docker compose up`: it must accept the run it created.
    procs = {}
    try:
        for name in ("aggregator", "worker", "evaluator"):
            log = tmp_path / f"{name}.log"
            with open(log, "w") as f:
                procs[name] = (subprocess.Popen(
                    [sys.executable, "-m", "diloco", *cmd[name], "--max-rounds", "1"],
                    env=env[name], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL), log)
        snap, frame, again = _diloco(status_json, ([*cmd["monitor"], "--once"], env["monitor"]),
                                     (cmd["init"], env["init"]), cwd=tmp_path)
        snap = json.loads(snap)
        assert snap["run"] == run and snap["version"] in (0, 1)
        assert (snap["config"]["task"], snap["config"]["sync_every"]) == ("tiny", 5)
        assert run in frame
        assert f"run {run} already exists" in again

        deadline = time.monotonic() + 120
        while any(proc.poll() is None for proc, _ in procs.values()):
            for name, (proc, log) in procs.items():  # fail on the first to fail, not at the deadline
                assert proc.poll() in (None, 0), f"{name} exited {proc.returncode}:\n{_tail(log)}"
            if time.monotonic() > deadline:
                running = [name for name, (proc, _) in procs.items() if proc.poll() is None]
                pytest.fail(f"{running} did not finish one round in 120 s:\n"
                            + "\n".join(_tail(log) for _, log in procs.values()))
            time.sleep(0.1)  # no event to wait on for "either process exits"
        for name, (proc, log) in procs.items():
            assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{_tail(log)}"
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    [snap] = _diloco(status_json, cwd=tmp_path)
    snap = json.loads(snap)
    assert snap["eval"], "the evaluator wrote no eval loss under its user"
    assert snap["version"] == 1, json.dumps(snap["rounds"])
    assert len(snap["workers"]) == 1, snap["workers"]
    # ...and the objects sit in the bucket under the store prefix compose sets
    prefix = urlsplit(env["worker"]["DILOCO_STORE"]).path.strip("/")
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/runs/{run}/weights/")
    assert [o["Key"].rsplit("/", 1)[-1][:9] for o in listing.get("Contents", [])] == ["v00000000", "v00000001"]
