"""`diloco sample`: text from a committed version, the same for the same seed."""

from __future__ import annotations

from diloco.cli import main as cli_main
from tests import harness

GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "seq_len": 16, "corpus_mb": 0.1}


def _sample(capsys, redis_url: str, store_url: str, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["sample", "--run", "t", "--redis-url", redis_url, "--store", store_url, "--prompt", "def f(",
                     "--max-new-tokens", "24", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_is_deterministic_for_a_seed_and_follows_the_version(redis_url, file_url, r, capsys):
    harness.init(redis_url, file_url, task="gpt", task_options=GPT, sync_every=5, batch_size=8, inner_lr=0.02)
    code, first, err = _sample(capsys, redis_url, file_url, "--seed", "3")
    assert code == 0 and "version 0, seed 3" in err
    assert first.startswith("def f(") and len(first.encode()) > len("def f(") + 16  # 24 bytes, some may merge
    assert _sample(capsys, redis_url, file_url, "--seed", "3")[1] == first
    assert _sample(capsys, redis_url, file_url, "--seed", "4")[1] != first

    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    w = harness.worker(redis_url, file_url, "w0", max_rounds=1)
    assert w.result() == 1 and agg.result() == 1
    code, trained, err = _sample(capsys, redis_url, file_url, "--seed", "3")
    assert code == 0 and "version 1" in err
    assert trained != first, "the head moved, so the text comes from other weights"
    assert _sample(capsys, redis_url, file_url, "--seed", "3", "--version", "0")[1] == first
    # greedy decoding needs no seed: any seed gives the same text
    greedy = _sample(capsys, redis_url, file_url, "--temperature", "0", "--seed", "1")[1]
    assert _sample(capsys, redis_url, file_url, "--temperature", "0", "--seed", "2")[1] == greedy


def test_sample_refuses_a_task_without_text(redis_url, file_url, capsys):
    harness.init(redis_url, file_url)  # tiny: a regression task
    code, out, err = _sample(capsys, redis_url, file_url)
    assert code == 2 and out == ""
    assert "task 'tiny' does not generate text" in err


def test_sample_refuses_a_version_the_run_does_not_have(redis_url, file_url, capsys):
    harness.init(redis_url, file_url, task="gpt", task_options=GPT, sync_every=20, batch_size=8)
    code, _, err = _sample(capsys, redis_url, file_url, "--version", "7")
    assert code == 2 and "has no version 7" in err
