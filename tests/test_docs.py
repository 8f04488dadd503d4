"""Keep the docs honest where it is cheap: every `diloco ...` command they show parses with the real CLI,
and every Redis key they name is one `diloco/keys.py` produces.

No Redis, no store, no subprocess: the commands go through `diloco.cli.build_parser().parse_args`, the
keys are matched against what each public function of `diloco.keys` returns for placeholder arguments.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest

from diloco import keys
from diloco.cli import build_parser
from diloco.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`\n]+)`")
# `diloco CMD` or `.venv/bin/diloco CMD`; `docker compose run --rm [--no-deps] init CMD` runs `diloco CMD` too
# (the image's entrypoint is `diloco`).
PROGRAM = re.compile(r"^(?:\S*/)?diloco$")
COMPOSE_INIT = ("docker", "compose", "run")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…")


def _doc_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, inside a fenced block) for every line, with `\\` continuations joined."""
    out: list[tuple[int, str, bool]] = []
    fenced = False
    pending: tuple[int, str] | None = None
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced and line.rstrip().endswith("\\"):
            start, text = pending or (no, "")
            pending = (start, text + line.rstrip()[:-1] + " ")
            continue
        if pending:
            out.append((pending[0], pending[1] + line, fenced))
            pending = None
        else:
            out.append((no, line, fenced))
    return out


def _argv_of(snippet: str) -> list[list[str]]:
    """The diloco argument lists in one shell snippet (several with `&&`, `;` or `|`)."""
    found = []
    for part in re.split(r"&&|;|\s\|\s|\|\|", snippet):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words[:3] == list(COMPOSE_INIT):
            rest = [w for w in words[3:] if w not in ("--rm", "--no-deps")]
            if rest[:1] == ["init"] and len(rest) > 1:
                found.append(rest[1:])
            continue
        if words and PROGRAM.match(words[0]) and len(words) > 1:
            found.append(words[1:])
    return found


def _shown_commands() -> list[tuple[str, int, str, list[str]]]:
    """(doc, line, command text, argv) for every diloco command shown in the docs."""
    cmds = []
    for path in DOCS:
        doc = path.relative_to(ROOT).as_posix()
        for no, line, fenced in _doc_lines(path):
            snippets = [line.lstrip("$ ").strip()] if fenced else INLINE.findall(line)
            for snippet in snippets:
                if fenced and not re.search(r"(^|[\s/=])diloco\s|docker compose run", snippet):
                    continue
                for argv in _argv_of(snippet):
                    text = " ".join(argv)
                    # placeholders and alternatives are not commands: `<pw>`, `...`, `stop|pause`, `ACTION`
                    if PLACEHOLDER.search(text) or "|" in text or "error:" in text:
                        continue
                    # optional parts shown in brackets are checked as given: `[--json]` -> `--json`
                    argv = [w.strip("[]") for w in argv if w.strip("[]")]
                    if re.fullmatch(r"[A-Z]+", argv[0]) or (len(argv) > 1 and re.fullmatch(r"[A-Z]{2,}", argv[1])):
                        continue  # `diloco ACTION ...`, `diloco control ACTION [TARGET]`: a synopsis, not a command
                    # a value in capitals is a placeholder (`--version N`, `--run R`, `kick W`): give it one
                    argv = [argv[0]] + ["1" if re.fullmatch(r"[A-Z]+", w) else w for w in argv[1:]]
                    cmds.append((doc, no, text, argv))
    return cmds


COMMANDS = _shown_commands()


def test_docs_show_commands() -> None:
    """The extraction itself works: the README's quick start and the operator table are found."""
    shown = {text for _, _, text, _ in COMMANDS}
    assert "run --workers 2 --max-versions 5" in shown
    assert any(t.startswith("recover") for t in shown)
    assert len(COMMANDS) > 30, f"only {len(COMMANDS)} diloco commands found in the docs"


def test_every_shown_command_parses() -> None:
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    failures = []
    for doc, no, text, argv in COMMANDS:
        if len(argv) == 1 and not argv[0].startswith("-"):
            # a command named in prose (`diloco export`): the subcommand must exist
            if argv[0] not in subcommands:
                failures.append(f"{doc}:{no}: `diloco {text}`: no subcommand {argv[0]!r}")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv)
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            failures.append(f"{doc}:{no}: `diloco {text}`: {lines[-1] if lines else 'rejected'}")
    assert not failures, "commands in the docs that the CLI rejects:\n" + "\n".join(failures)


# --- Redis keys --------------------------------------------------------------------------------

SEGMENT = "[^:{}]+|\\{[^:{}]+\\}"  # a placeholder segment in a doc: `w0`, `ds`, `0`, `{id}`, `{e}`
PLACEHOLDERS = {"run": "RUN", "worker": "WORKER", "dataset": "DATASET", "epoch": "EPOCH"}


def _key_patterns() -> dict[str, re.Pattern[str]]:
    """keys.py function name -> regex a doc's key must match, built from what the function returns."""
    patterns = {}
    for name, fn in inspect.getmembers(keys, inspect.isfunction):
        if name.startswith("_") or fn.__module__ != keys.__name__:
            continue
        params = list(inspect.signature(fn).parameters)
        if not set(params) <= set(PLACEHOLDERS) or "run" not in params:
            continue  # object-store keys and helpers
        key = fn(**{p: PLACEHOLDERS[p] for p in params})
        if not isinstance(key, str) or not key.startswith("diloco:"):
            continue
        patterns[name] = _pattern(key)
        # a streaming run's fragment (lane `RUN@f7`): `diloco:{r1}:f2:head`, `diloco:{run}:f{i}:head`
        lane_key = fn(**{p: keys.lane("RUN", 7) if p == "run" else PLACEHOLDERS[p] for p in params})
        if lane_key != key:
            patterns[f"{name} (fragment)"] = _pattern(lane_key)
    return patterns


def _pattern(key: str) -> re.Pattern[str]:
    parts = []
    for seg in key.split(":"):
        if seg == "{RUN}":
            parts.append(r"\{[^:{}]+\}")
        elif seg in PLACEHOLDERS.values():
            parts.append(f"(?:{SEGMENT})")
        elif seg == "f7":
            parts.append(r"f(?:\d+|\{[^:{}]+\})")
        else:
            parts.append(re.escape(seg))
    return re.compile(":".join(parts))


KEY_IN_TEXT = re.compile(r"diloco:\{[^}\s`']+\}(?::[A-Za-z0-9_.{}\-*]+)*")
KEY_TABLE_HEADER = re.compile(r"^\|\s*key\s*\|")


def _shown_keys() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        doc = path.relative_to(ROOT).as_posix()
        in_key_table = False
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if KEY_TABLE_HEADER.match(line):
                in_key_table = True
                continue
            if not line.startswith("|"):
                in_key_table = False
            elif in_key_table and not line.startswith("|---"):
                # tables of keys name them relative to the run: `units:ds:e:claimed`
                first = line.split("|")[1].strip()
                if first.startswith("`") and first.endswith("`"):
                    found.append((doc, no, "diloco:{r1}:" + first.strip("`")))
            for span in INLINE.findall(line):
                for key in KEY_IN_TEXT.findall(span):
                    if "*" in key or ".." in key or key.endswith("}"):
                        continue  # a glob, an elided key or the bare prefix
                    found.append((doc, no, key))
    return found


SHOWN_KEYS = _shown_keys()


def test_docs_show_keys() -> None:
    shown = {k for _, _, k in SHOWN_KEYS}
    assert "diloco:{r1}:rejected:entries" in shown
    assert len(shown) > 15, f"only {len(shown)} Redis keys found in the docs"


def test_every_shown_key_is_one_keys_py_makes() -> None:
    patterns = _key_patterns()
    assert {"config", "head", "units_done", "rejected_entries", "worker_alive"} <= set(patterns)
    failures = [f"{doc}:{no}: `{key}` is not a key diloco/keys.py produces"
                for doc, no, key in SHOWN_KEYS if not any(p.fullmatch(key) for p in patterns.values())]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("key", ["diloco:{r1}:bogus", "diloco:{r1}:units:ds:0:claimd", "diloco:{r1}:round:x"])
def test_a_wrong_key_is_caught(key: str) -> None:
    assert not any(p.fullmatch(key) for p in _key_patterns().values())


# --- settings `diloco control set` can change ---------------------------------------------------

@pytest.mark.parametrize(("doc", "marker"), [("docs/architecture.md", "## Operator control"),
                                             ("docs/operations.md", "| `set NAME=VALUE` |")])
def test_docs_list_every_tunable_setting(doc: str, marker: str) -> None:
    text = (ROOT / doc).read_text()
    assert marker in text, f"{doc}: no {marker!r}"
    listing = text[text.index(marker):].split("\n\n", 2)
    listing = "\n".join(listing[:2])
    named = set(re.findall(r"[a-z_]+", listing)) & set(RunConfig.TUNABLE)
    missing = sorted(set(RunConfig.TUNABLE) - named)
    assert not missing, f"{doc}, {marker!r}: tunable settings not listed: {missing}"
