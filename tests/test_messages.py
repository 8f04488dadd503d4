"""Stream messages: round trip, and every malformed field rejected as BadMessage naming it."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diloco import digest, keys
from diloco.errors import BadInput, BadMessage
from diloco.messages import MAX_SHARDS, Announcement, Head, Kind
from diloco.store import digest_of

SHA = digest_of(b"x")
SHA2 = digest_of(b"y")

REQUIRED = ["kind", "run", "worker", "nonce", "version", "codec", "shards", "sizes", "digest", "samples",
            "tokens", "inner_steps", "loss"]


def _ann(**kw) -> Announcement:
    base = dict(
        run="r1", worker="w1", nonce="n1", version=3, codec="bf16",
        shards=(keys.delta_shard("r1", 3, "w1", "n1", 0), keys.delta_shard("r1", 3, "w1", "n1", 1)),
        sizes=(100, 50), digest=(SHA, SHA2), samples=64, tokens=8192, inner_steps=500, loss=2.5,
        train_s=12.25, fragment=0, units=(),
    )
    return Announcement(**{**base, **kw})


def _fields(**changes: str) -> dict[str, str]:
    return {**_ann().to_fields(), **changes}


def test_round_trip():
    ann = _ann()
    fields = ann.to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert fields["kind"] == "delta"
    assert fields["shards"] == ",".join(ann.shards)
    assert fields["sizes"] == "100,50"
    assert fields["loss"] == "2.5"
    assert fields["train_s"] == "12.250"
    assert Announcement.from_fields(fields) == ann
    assert ann.nbytes == 150
    assert ann.kind is Kind.DELTA


def test_round_trip_with_units_and_fragment():
    ann = _ann(units=((0, 3), (0, 7), (1, 0)), fragment=0)
    back = Announcement.from_fields(ann.to_fields())
    assert back.units == ((0, 3), (0, 7), (1, 0))
    assert back == ann


def test_loss_round_trips_exactly():
    loss = 1 / 3
    assert Announcement.from_fields(_ann(loss=loss).to_fields()).loss == loss


def test_optional_fields_default():
    fields = _fields()
    for name in ("train_s", "fragment", "units"):
        del fields[name]
    ann = Announcement.from_fields(fields)
    assert ann.train_s == 0.0 and ann.fragment == 0 and ann.units == ()


_name = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,15}\Z")


@settings(max_examples=50, deadline=None)
@given(
    run=_name, worker=_name, nonce=_name, version=st.integers(0, 10**9),
    codec=st.sampled_from(["fp32", "bf16"]),
    shards=st.lists(st.tuples(st.from_regex(r"\A[a-z0-9/._-]{1,30}\Z"), st.integers(0, 10**9),
                              st.binary(max_size=4)), min_size=1, max_size=20),
    samples=st.integers(0, 10**9), tokens=st.integers(0, 10**12), inner_steps=st.integers(1, 10**6),
    loss=st.floats(allow_nan=False, allow_infinity=False),
    train_ms=st.integers(0, 10**9),
    units=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 1000)), max_size=5, unique=True),
)
def test_round_trip_property(run, worker, nonce, version, codec, shards, samples, tokens, inner_steps, loss,
                             train_ms, units):
    ann = Announcement(
        run=run, worker=worker, nonce=nonce, version=version, codec=codec,
        shards=tuple(s for s, _, _ in shards), sizes=tuple(n for _, n, _ in shards),
        digest=tuple(digest_of(b) for _, _, b in shards), samples=samples, tokens=tokens,
        inner_steps=inner_steps, loss=loss, train_s=train_ms / 1000, units=tuple(units),
    )
    assert Announcement.from_fields(ann.to_fields()) == ann


# --- rejections --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REQUIRED)
def test_missing_required_field_is_named(name):
    fields = _fields()
    del fields[name]
    with pytest.raises(BadMessage, match=f"'{name}'"):
        Announcement.from_fields(fields)


def test_bad_message_is_bad_input():
    assert issubclass(BadMessage, BadInput)


@pytest.mark.parametrize("name", ["run", "worker", "version", "samples"])
def test_non_string_value_is_rejected(name):
    fields: dict = _fields()
    fields[name] = 3 if name != "run" else b"r1"
    with pytest.raises(BadMessage, match=f"'{name}'"):
        Announcement.from_fields(fields)


@pytest.mark.parametrize(("name", "raw"), [
    ("version", "abc"), ("version", "1.5"), ("version", ""), ("version", "-1"),
    ("samples", "x"), ("samples", "-5"), ("tokens", "1e6"), ("tokens", "-1"),
    ("inner_steps", "0"), ("inner_steps", "many"), ("fragment", "-1"), ("fragment", "one"),
    ("loss", "nan"), ("loss", "NaN"), ("loss", "inf"), ("loss", "-inf"), ("loss", "low"), ("loss", ""),
    ("train_s", "nan"), ("train_s", "soon"),
])
def test_ill_typed_numbers_name_the_field(name, raw):
    with pytest.raises(BadMessage, match=f"'{name}'"):
        Announcement.from_fields(_fields(**{name: raw}))


def test_nan_loss_is_rejected():
    with pytest.raises(BadMessage, match="not finite"):
        Announcement.from_fields(_fields(loss="nan"))


@pytest.mark.parametrize("changes", [
    {"sizes": "100"},
    {"sizes": "100,50,7"},
    {"digest": SHA},
    {"digest": f"{SHA},{SHA2},{SHA}"},
    {"shards": "a"},
])
def test_mismatched_list_lengths(changes):
    with pytest.raises(BadMessage, match="different lengths"):
        Announcement.from_fields(_fields(**changes))


@pytest.mark.parametrize("bad", [
    SHA.upper(), SHA[:-1], SHA + "0", "g" * 64, "", " " + SHA[1:], SHA[:-1] + "-",
])
def test_bad_digest(bad):
    with pytest.raises(BadMessage, match="digest"):
        Announcement.from_fields(_fields(digest=f"{SHA},{bad}"))


@pytest.mark.parametrize("sizes", ["100,-1", "-5,5"])
def test_negative_sizes(sizes):
    with pytest.raises(BadMessage, match="negative"):
        Announcement.from_fields(_fields(sizes=sizes))


@pytest.mark.parametrize("sizes", ["100,x", "1.5,2", "100,"])
def test_non_integer_sizes(sizes):
    with pytest.raises(BadMessage, match="sizes"):
        Announcement.from_fields(_fields(sizes=sizes))


@pytest.mark.parametrize("units", ["1,a", "0:1,0:a", "0:-1", "-1:2", "0:1:2", "0:1,0:1", "x" * 30])
def test_malformed_units(units):
    with pytest.raises(BadMessage, match="units"):
        Announcement.from_fields(_fields(units=units))


def test_too_many_shards():
    n = MAX_SHARDS + 1
    fields = _fields(shards=",".join(f"s{i}" for i in range(n)), sizes=",".join(["1"] * n),
                     digest=",".join([SHA] * n))
    with pytest.raises(BadMessage, match=str(MAX_SHARDS)):
        Announcement.from_fields(fields)


def test_max_shards_is_accepted():
    n = MAX_SHARDS
    fields = _fields(shards=",".join(f"s{i}" for i in range(n)), sizes=",".join(["1"] * n),
                     digest=",".join([SHA] * n))
    assert len(Announcement.from_fields(fields).shards) == MAX_SHARDS


def test_empty_shards():
    with pytest.raises(BadMessage, match="no shards"):
        Announcement.from_fields(_fields(shards="", sizes="", digest=""))


@pytest.mark.parametrize(("name", "value"), [
    ("worker", "w/1"), ("worker", ""), ("worker", "w 1"), ("worker", "{w1}"), ("worker", "x" * 65),
    ("run", "r:1"), ("nonce", "../n"),
])
def test_bad_names(name, value):
    with pytest.raises(BadMessage, match="invalid"):
        Announcement.from_fields(_fields(**{name: value}))


@pytest.mark.parametrize("kind", ["", "weights", "DELTA"])
def test_unknown_kind(kind):
    with pytest.raises(BadMessage, match="unknown kind"):
        Announcement.from_fields(_fields(kind=kind))


def test_codec_is_carried_verbatim():
    # The aggregator compares it with the run's codec; the message layer only requires a string.
    assert Announcement.from_fields(_fields(codec="fp32")).codec == "fp32"


# --- Head --------------------------------------------------------------------------------------

HEAD = {
    "version": "4", "weights": keys.weights_object("r1", 4, 2), "weights_digest": SHA,
    "momentum": keys.momentum_object("r1", 4, 2), "momentum_digest": SHA2, "token": "2",
    "committed_ms": "1700000000000", "deltas_since": "1700000000000-0",
}


def test_head_from_fields():
    head = Head.from_fields(HEAD)
    assert head == Head(version=4, weights="runs/r1/weights/v00000004-t2.safetensors", weights_digest=SHA,
                        momentum="runs/r1/momentum/v00000004-t2.safetensors", momentum_digest=SHA2,
                        token=2, committed_ms=1_700_000_000_000, deltas_since="1700000000000-0")


@pytest.mark.parametrize("name", sorted(HEAD))
def test_head_missing_field_is_named(name):
    fields = {k: v for k, v in HEAD.items() if k != name}
    with pytest.raises(BadMessage, match=f"'{name}'"):
        Head.from_fields(fields)


@pytest.mark.parametrize(("name", "raw"), [
    ("version", "x"), ("version", "-1"), ("token", "t"), ("committed_ms", "now"),
])
def test_head_ill_typed_field_is_named(name, raw):
    with pytest.raises(BadMessage, match=f"'{name}'"):
        Head.from_fields({**HEAD, name: raw})


def test_digest_with_trailing_newline_is_rejected():
    with pytest.raises(BadMessage, match="digest"):
        Announcement.from_fields(_fields(digest=f"{SHA},{SHA2}\n"))


# --- records written before BLAKE3 digests (sha256, fields named *sha256) ------------------------

LEGACY_A, LEGACY_B = hashlib.sha256(b"x").hexdigest(), hashlib.sha256(b"y").hexdigest()


def test_a_legacy_announcement_keeps_its_sha256_digests():
    fields = _fields()
    del fields["digest"]
    ann = Announcement.from_fields({**fields, "sha256": f"{LEGACY_A},{LEGACY_B}"})
    assert ann.digest == (LEGACY_A, LEGACY_B)
    assert Announcement.from_fields(ann.to_fields()) == ann   # written back in today's field name


def test_a_legacy_head_keeps_its_sha256_digests():
    legacy = {k: v for k, v in HEAD.items() if not k.endswith("_digest")}
    head = Head.from_fields({**legacy, "weights_sha256": LEGACY_A, "momentum_sha256": LEGACY_B,
                             "update": "u/a", "update_sha256": LEGACY_A})
    assert (head.weights_digest, head.momentum_digest, head.update_digest) == (LEGACY_A, LEGACY_B, (LEGACY_A,))
    # a head that has both (rewritten by a commit) is read by today's names
    both = Head.from_fields({**HEAD, "weights_sha256": LEGACY_A, "momentum_sha256": LEGACY_B})
    assert (both.weights_digest, both.momentum_digest) == (SHA, SHA2)


def test_digest_forms():
    assert SHA.startswith("blake3:") and len(SHA) == len("blake3:") + 64
    assert digest.valid(SHA) and digest.valid(LEGACY_A)
    assert not any(digest.valid(v) for v in ("sha256:" + LEGACY_A, "blake3:" + "0" * 63, SHA.upper(), ""))
    assert digest.of(b"x", like=LEGACY_B) == LEGACY_A   # checked in the form it was recorded in
    assert digest.of([b"a", memoryview(b"bc")]) == digest.of(b"abc") == digest.of(b"abc", like=SHA)
