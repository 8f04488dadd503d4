"""The hf task (diloco[hf]): a transformers causal LM on local text, over real Redis and S3, no downloads.

The models are tiny GPT-2 configs and the data a folder of text the test writes; a model directory
with its own tokenizer is made here too (a word-level tokenizer trained with `tokenizers`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from diloco import keys, runs
from diloco.cli import main as cli_main
from diloco.errors import ConfigError
from diloco.evaluate import eval_loss
from diloco.export import export
from diloco.store import open_store
from diloco.tasks import load_task
from diloco.tasks.hf import read_documents, to_pretrained
from tests import harness

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "hex", "jolly", "cabs")
CONFIG = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 257, "n_positions": 32}


def write_texts(folder: Path, docs: int = 30, words: int = 120) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    for i in range(docs):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rnd.choice(WORDS) for _ in range(words)) + ".\n")
    return folder


def _weights(store_url: str, r, version: int) -> dict[str, torch.Tensor]:
    entry = {int(f["version"]): f for _, f in r.xrange(keys.versions("t"))}[version]
    return runs.model.from_bytes(open_store(store_url).get(entry["weights"], digest=entry["weights_digest"]), "w")


def test_hf_task_trains_over_s3_with_two_workers_and_exports_to_from_pretrained(redis_url, s3_url, r, tmp_path,
                                                                                 capsys):
    options = {"data": str(write_texts(tmp_path / "texts")), "config": CONFIG, "seq_len": 32}
    cfg = harness.init(redis_url, s3_url, task="hf", task_options=options, min_workers=2, sync_every=10,
                       batch_size=8, inner_lr=0.01)
    assert cfg.task_options["tokenizer"] == "byte"
    store = open_store(s3_url)
    v0 = runs.load_weights(store, runs.read_head(r, "t"))
    versions = 3
    agg = harness.aggregator(redis_url, s3_url, max_rounds=versions)
    ws = [harness.worker(redis_url, s3_url, f"w{i}", max_rounds=versions) for i in range(2)]
    assert agg.result(300) == versions and [w.result(300) for w in ws] == [versions] * 2
    assert [f["n"] for _, f in r.xrange(keys.versions("t"))] == ["2"] * versions

    task = load_task("hf", cfg.task_options)
    net = runs.build_model(task, cfg.seed)
    losses = []
    for state in (v0, _weights(s3_url, r, versions)):
        net.load_state_dict(state)
        losses.append(eval_loss(task, net, max_samples=64))
    assert losses[1] < 0.7 * losses[0], f"eval loss did not fall: {losses}"

    # export -> a save_pretrained directory -> from_pretrained gives the same model
    out = export(r, store, "t", tmp_path / "model.safetensors")
    hf_dir = to_pretrained(out.path, tmp_path / "hf-model")
    loaded = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, use_safetensors=True)
    ids = task.train_data().batch([0, 1])["x"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, task.logits(net.eval(), ids))

    # diloco sample works on the hf task, and is deterministic for a seed
    argv = ["sample", "--run", "t", "--redis-url", redis_url, "--store", s3_url, "--prompt", "the quick",
            "--max-new-tokens", "24", "--seed", "5"]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("the quick")


def _model_dir_with_tokenizer(path: Path, texts: Path) -> Path:
    """A local model directory: a word-level tokenizer trained on `texts` and a tiny GPT-2 saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train([str(p) for p in sorted(texts.iterdir())], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    fast.save_pretrained(path)
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=len(fast), n_positions=16,
                                  eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


def test_hf_task_from_a_local_model_directory_and_its_tokenizer(redis_url, file_url, r, tmp_path):
    texts = write_texts(tmp_path / "texts", docs=20, words=60)
    model_dir = _model_dir_with_tokenizer(tmp_path / "model", texts)
    options = {"data": str(texts), "model_dir": str(model_dir), "seq_len": 16}
    cfg = harness.init(redis_url, file_url, task="hf", task_options=options, sync_every=5, batch_size=4)
    assert cfg.task_options["tokenizer"] == "model"
    task = load_task("hf", cfg.task_options)
    # version 0 holds the directory's weights (the output layer untied from the input embeddings)
    saved = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).state_dict()
    v0 = runs.load_weights(open_store(file_url), runs.read_head(r, "t"))
    torch.testing.assert_close(v0["transformer.wte.weight"], saved["transformer.wte.weight"])
    torch.testing.assert_close(v0["lm_head.weight"], saved["transformer.wte.weight"])
    assert v0["lm_head.weight"].data_ptr() != v0["transformer.wte.weight"].data_ptr()
    # one token per word (and one per document end): far fewer tokens than bytes
    assert len(task.train_data()) * 16 < 20 * 60 * 2
    assert task.decode(task.encode("the lazy fox")) == "the lazy fox"
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    w = harness.worker(redis_url, file_url, "w0", max_rounds=1)
    assert w.result(300) == 1 and agg.result(300) == 1


def test_documents_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "b.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(3, 5)))
    (tmp_path / "j" / "a.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(3)))
    assert read_documents(str(tmp_path / "j"), "body") == [f"doc {i}" for i in range(5)]  # sorted by path
    with pytest.raises(ConfigError, match="no column 'text'"):
        read_documents(str(tmp_path / "j"), "text")
    pq.write_table(pa.table({"text": ["first", "second"]}), tmp_path / "p.parquet")
    assert read_documents(str(tmp_path / "p.parquet"), "text") == ["first", "second"]
    (tmp_path / "j" / "c.txt").write_text("x")
    with pytest.raises(ConfigError, match="mixes file kinds"):
        read_documents(str(tmp_path / "j"), "body")


@pytest.mark.parametrize(("options", "message"), [
    ({"config": CONFIG}, "option 'data'"),
    ({"data": "x"}, "exactly one of 'model_dir'"),
    ({"data": "x", "config": {"n_layer": 1}}, "needs a 'model_type'"),
    ({"data": "x", "config": CONFIG, "tokenizer": "model"}, "tokenizer 'model' needs a 'model_dir'"),
])
def test_hf_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        load_task("hf", options)


def test_a_vocabulary_smaller_than_the_byte_tokenizer_is_refused(tmp_path):
    task = load_task("hf", {"data": str(write_texts(tmp_path / "t", docs=2)), "config": {**CONFIG, "vocab_size": 100}})
    with pytest.raises(ConfigError, match="vocab_size to at least 257"):
        task.build_model()
