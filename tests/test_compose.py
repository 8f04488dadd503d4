"""compose.yaml, .env.example and the Dockerfile, checked without a Docker engine.

The file is parsed and interpolated the way `docker compose` does it (a small resolver for
`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `$VAR` and
`$$`), with values from .env.example. Every diloco service's command must parse with the real CLI,
and the init, aggregator, worker and monitor commands are then run, with the environment compose
gives them, against the test session's redis-server and S3 server: only the host names and the
bucket are swapped for the local ones.
"""

from __future__ import annotations

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
import yaml

from diloco.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SECRETS = ("REDIS_PASSWORD", "MINIO_ROOT_PASSWORD")
TEST_SECRETS = {"REDIS_PASSWORD": "redis-test-pw", "MINIO_ROOT_PASSWORD": "minio-test-pw"}
# service -> the CLI subcommand it runs
DILOCO_SERVICES = {"init": "init", "aggregator": "aggregator", "worker": "worker", "monitor": "status"}
EXPECTED_SERVICES = {"redis", "minio", "createbucket", *DILOCO_SERVICES}
DILOCO_ENV = ("DILOCO_REDIS_URL", "DILOCO_STORE", "DILOCO_S3_ENDPOINT", "DILOCO_RUN",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


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
    """The services as compose would run them with .env.example plus the two passwords."""
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


# ---- variables ----

def test_every_variable_is_documented_or_defaulted(raw, dotenv):
    refs = {(name, op) for s in strings(raw) for name, op in references(s)}
    undefined = sorted({name for name, op in refs if op not in (":-", "-") and name not in dotenv})
    assert not undefined, \
        f"compose.yaml uses variables without a default that .env.example lacks: {undefined}"
    unused = sorted(set(dotenv) - {name for name, _ in refs})
    assert not unused, f".env.example sets variables compose.yaml never uses: {unused}"


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
    resolve(raw, {**dotenv, **TEST_SECRETS})  # and with both set, everything resolves


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


@pytest.mark.parametrize(("service", "repo"), [("minio", "minio/minio"), ("createbucket", "minio/mc")])
def test_minio_images_pinned(raw, service, repo):
    image = raw["services"][service]["image"]
    name, _, tag = image.rpartition(":")
    assert name == repo, image
    assert tag.startswith("RELEASE.") and tag != "latest", f"{service}: pin a release tag, not {image!r}"


def test_redis(services):
    redis = services["redis"]
    name, _, tag = redis["image"].rpartition(":")
    assert name == "redis" and re.fullmatch(r"\d+\.\d+(\.\d+)?", tag), \
        f"pin a redis version: {redis['image']}"
    cmd = command_of(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--requirepass") + 1] == TEST_SECRETS["REDIS_PASSWORD"]
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test and "$REDIS_PASSWORD" in test
    # the healthcheck's $REDIS_PASSWORD is expanded by the container's shell, from its environment
    assert env_of(redis)["REDIS_PASSWORD"] == TEST_SECRETS["REDIS_PASSWORD"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_minio_and_bucket(services):
    minio, mc = services["minio"], services["createbucket"]
    assert command_of(minio)[:2] == ["server", "/data"]
    assert "curl" not in " ".join(minio["healthcheck"]["test"]), "recent MinIO images have no curl"
    assert any(v.endswith(":/data") for v in minio["volumes"])
    script = " ".join(command_of(mc))
    assert "mc mb --ignore-existing" in script
    assert env_of(mc)["MINIO_ROOT_PASSWORD"] == env_of(minio)["MINIO_ROOT_PASSWORD"]


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
    for one_shot in ("createbucket", "init"):
        assert services[one_shot].get("restart", "no") == "no"


def test_diloco_services_share_one_wiring(services):
    redis_pw = TEST_SECRETS["REDIS_PASSWORD"]
    for name in DILOCO_SERVICES:
        svc = services[name]
        assert svc["image"] == "diloco:latest" and svc["build"]["context"] == ".", name
        env = env_of(svc)
        assert set(DILOCO_ENV) <= set(env), f"{name} lacks {set(DILOCO_ENV) - set(env)}"
        url = urlsplit(env["DILOCO_REDIS_URL"])
        assert (url.scheme, url.hostname, url.port, url.password) == ("redis", "redis", 6379, redis_pw), name
        endpoint = urlsplit(env["DILOCO_S3_ENDPOINT"])
        assert (endpoint.hostname, endpoint.port) == ("minio", 9000), name
        store = urlsplit(env["DILOCO_STORE"])
        assert store.scheme == "s3" and store.netloc == env_of(services["createbucket"])["BUCKET"], name
        minio = env_of(services["minio"])
        assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"], name
        deps = svc.get("depends_on") or {}
        assert "redis" in deps or "init" in deps, f"{name} must wait for redis (or for init)"


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


# ---- the commands, run against real services ----

def _local_env(svc: dict[str, Any], redis_url: str, s3_endpoint: str, bucket: str) -> dict[str, str]:
    """The service's compose environment with the compose hosts and bucket swapped for the test's.

    Nothing DILOCO_* or AWS_* leaks in from the test process, so a variable missing from compose
    makes the command fail here too."""
    env = env_of(svc)
    local = {"DILOCO_REDIS_URL": redis_url,  # the test redis has no password: swap the whole URL
             "DILOCO_S3_ENDPOINT": s3_endpoint,
             "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
             "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
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
    # A tiny task, short rounds and one torch thread, set the way an operator would: in .env.
    settings = {**dotenv, **TEST_SECRETS, "TASK": "tiny", "SYNC_EVERY": "5", "WORKER_THREADS": "1"}
    services = resolve(raw, settings)["services"]
    bucket = urlsplit(s3_url).netloc
    env = {name: _local_env(services[name], redis_url, s3_server.endpoint, bucket)
           for name in DILOCO_SERVICES}
    cmd = {name: command_of(services[name]) for name in DILOCO_SERVICES}
    status_json = ([*cmd["monitor"], "--json"], env["monitor"])
    run = settings["RUN"]

    [out] = _diloco((cmd["init"], env["init"]), cwd=tmp_path)
    assert f"run {run} created" in out

    # An aggregator and a worker for one round; meanwhile the monitor (both forms), and init once
    # more, as on every `docker compose up`: it must accept the run it created.
    procs = {}
    try:
        for name in ("aggregator", "worker"):
            log = tmp_path / f"{name}.log"
            with open(log, "w") as f:
                procs[name] = (subprocess.Popen(
                    [sys.executable, "-m", "diloco", *cmd[name], "--max-rounds", "1"],
                    env=env[name], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL), log)
        snap, table, again = _diloco(status_json, (cmd["monitor"], env["monitor"]), (cmd["init"], env["init"]),
                                     cwd=tmp_path)
        snap = json.loads(snap)
        assert snap["run"] == run and snap["version"] in (0, 1)
        assert (snap["config"]["task"], snap["config"]["sync_every"]) == ("tiny", 5)
        assert run in table
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
    assert snap["version"] == 1, json.dumps(snap["rounds"])
    assert len(snap["workers"]) == 1, snap["workers"]
    # ...and the objects sit in the bucket under the store prefix compose sets
    prefix = urlsplit(env["worker"]["DILOCO_STORE"]).path.strip("/")
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/runs/{run}/weights/")
    assert [o["Key"].rsplit("/", 1)[-1][:9] for o in listing.get("Contents", [])] == ["v00000000", "v00000001"]
