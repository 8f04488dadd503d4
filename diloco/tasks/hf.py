"""The Hugging Face task: a causal language model from `transformers`, trained on local text files.

Needs the optional extra `pip install 'diloco[hf]'` (transformers, datasets, tokenizers). Nothing is
downloaded: the model is built from a local model directory (`model_dir`, read with
`from_pretrained(..., local_files_only=True, use_safetensors=True)`) or from a config given in the
task options (`config`, e.g. {"model_type": "gpt2", "n_layer": 4, ...}, initialised from the run's
seed). The data is a file or a directory of `.txt`/`.md` (one document per file), `.jsonl`/`.json`
or `.parquet` files (one document per row, in the column `text_field`), read through
`datasets.load_dataset` in sorted path order. Tokens come from the model directory's tokenizer
(`tokenizer: "model"`) or are UTF-8 bytes (`"byte"`, ids 0-255, and 256 ends each document).

Documents are tokenized, each followed by the end-of-document token, joined into one stream and cut
into windows of `seq_len + 1` tokens (like the gpt task); the last `eval_fraction` of the stream is
the held-out split. A split's `dataset_id` hashes its tokens, so two machines with other files or
another tokenizer get different ids and the worker refuses to start.

Input and output embeddings are untied (the output layer gets its own copy): the rest of the system
keeps one tensor per state-dict entry. `diloco export` output becomes a `save_pretrained` directory
with `to_pretrained` below.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diloco.errors import ConfigError
from diloco.tasks import check, make_dataset_id, parse_options
from diloco.tasks.gpt import ByteDataset

FORMAT = "hf-packed-v1"
BYTE_EOS = 256
BYTE_VOCAB = 257
KINDS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HINT = "the hf task needs the optional extra: pip install 'diloco[hf]'"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFOptions:
    data: str = ""                      # a file or a directory of text, JSONL or Parquet files
    model_dir: str = ""                 # a local model directory (config.json + safetensors weights)
    config: dict = field(default_factory=dict)  # or a model config: {"model_type": "gpt2", ...}
    tokenizer: str = ""                 # "model" (the model directory's) or "byte"; "" = model if model_dir
    text_field: str = "text"            # the column of JSONL and Parquet rows
    seq_len: int = 128
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        check(bool(self.data), "hf", "option 'data' (a file or directory of training text) is required")
        check(bool(self.model_dir) != bool(self.config), "hf",
              "give exactly one of 'model_dir' (a local model directory) and 'config' (a model config dict)")
        check(not self.config or "model_type" in self.config, "hf",
              "option 'config' needs a 'model_type', e.g. {\"model_type\": \"gpt2\", \"n_layer\": 2}")
        check(self.tokenizer in ("", "model", "byte"), "hf", "option 'tokenizer' must be 'model' or 'byte'")
        check(self.tokenizer != "model" or bool(self.model_dir), "hf",
              "tokenizer 'model' needs a 'model_dir' holding the tokenizer; use 'byte' with a config")
        check(self.seq_len >= 1, "hf", "option 'seq_len' must be >= 1")
        check(0 < self.eval_fraction < 1, "hf", "option 'eval_fraction' must be between 0 and 1")


def _import_hf() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"{HINT} ({e})") from None
    return transformers


# ---- data ----

def data_files(path: str) -> tuple[str, list[str]]:
    """(datasets builder name, sorted file paths) for a file or directory of one kind of file."""
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in KINDS),
                       key=lambda p: p.relative_to(root).as_posix())
    else:
        raise ConfigError(f"task 'hf': data {path!r} is neither a file nor a directory")
    kinds = {KINDS.get(p.suffix.lower()) for p in files}
    if not files or None in kinds:
        raise ConfigError(f"task 'hf': no .txt, .md, .jsonl, .json or .parquet files in {path!r}")
    if len(kinds) > 1:
        raise ConfigError(f"task 'hf': {path!r} mixes file kinds ({', '.join(sorted(kinds))}); use one kind")
    return kinds.pop(), [str(p) for p in files]


def read_documents(path: str, text_field: str) -> list[str]:
    """Every document's text, in file order then row order."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{HINT} ({e})") from None
    datasets.disable_progress_bars()  # a worker's log is no terminal
    kind, files = data_files(path)
    extra = {"sample_by": "document"} if kind == "text" else {}
    ds = datasets.load_dataset(kind, data_files=files, split="train", **extra)
    column = "text" if kind == "text" else text_field
    if column not in ds.column_names:
        raise ConfigError(f"task 'hf': the rows of {path!r} have no column {column!r} "
                          f"(columns: {', '.join(ds.column_names)}); set the option text_field")
    return [t for t in ds[column] if t]


class Tokenizer:
    """Text <-> token ids: the model directory's tokenizer, or UTF-8 bytes."""

    def __init__(self, kind: str, model_dir: str) -> None:
        self.kind = kind
        self.hf = None
        if kind == "model":
            self.hf = _import_hf().AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.eos = self.hf.eos_token_id
            if self.eos is None:
                raise ConfigError(f"task 'hf': the tokenizer in {model_dir} has no end-of-text token")
            self.vocab = len(self.hf)
        else:
            self.eos, self.vocab = BYTE_EOS, BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        if self.hf is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=True)

    def stream(self, docs: list[str]) -> torch.Tensor:
        """All documents' tokens, each followed by the end-of-document token, as one int64 tensor."""
        parts = []
        for start in range(0, len(docs), 1000):
            batch = docs[start:start + 1000]
            ids = [list(d.encode("utf-8")) for d in batch] if self.hf is None else \
                self.hf(batch, add_special_tokens=False)["input_ids"]
            parts += [torch.tensor([*doc, self.eos], dtype=torch.int64) for doc in ids]
        return torch.cat(parts)


# ---- task ----

class HFTask:
    name = "hf"
    defaults: ClassVar[dict[str, Any]] = {"sync_every": 100, "batch_size": 8}

    def __init__(self, opts: HFOptions) -> None:
        tokenizer = opts.tokenizer or ("model" if opts.model_dir else "byte")
        self.opts = HFOptions(**{**asdict(opts), "tokenizer": tokenizer})
        self.options: dict[str, Any] = asdict(self.opts)
        self._tokenizer: Tokenizer | None = None
        self._splits: dict[str, ByteDataset] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.opts.tokenizer, self.opts.model_dir)
        return self._tokenizer

    def _model_config(self) -> Any:
        transformers = _import_hf()
        o = self.opts
        if o.model_dir:
            return transformers.AutoConfig.from_pretrained(o.model_dir, local_files_only=True)
        options = dict(o.config)
        model_type = options.pop("model_type")
        if o.tokenizer == "byte":  # the byte tokenizer's end-of-document token, unless the config says otherwise
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                options.setdefault(key, BYTE_EOS)
        try:
            return transformers.AutoConfig.for_model(model_type, **options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"task 'hf': option config is not a valid {model_type!r} config: {e}") from None

    def build_model(self) -> nn.Module:
        transformers = _import_hf()
        cfg = self._model_config()
        if self.opts.model_dir:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.opts.model_dir, local_files_only=True, use_safetensors=True)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        model = model.float()
        model.config.use_cache = False  # training and our sampling recompute every position
        _untie(model)
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab < self.tokenizer.vocab:
            raise ConfigError(f"task 'hf': the model's vocabulary ({vocab}) is smaller than the tokenizer's "
                              f"({self.tokenizer.vocab}); with the byte tokenizer set vocab_size to at least "
                              f"{BYTE_VOCAB}")
        return model

    def _data(self) -> dict[str, ByteDataset]:
        if self._splits is None:
            o = self.opts
            tokens = self.tokenizer.stream(read_documents(o.data, o.text_field))
            cut = len(tokens) - int(len(tokens) * o.eval_fraction)
            self._splits = {}
            for split, (lo, hi) in {"train": (0, cut), "eval": (cut, len(tokens))}.items():
                if hi - lo < o.seq_len + 1:
                    raise ConfigError(f"task 'hf': the {split} split has {hi - lo} tokens, fewer than one sample "
                                      f"of seq_len={o.seq_len}; add data or change eval_fraction")
                part = tokens[lo:hi].contiguous()
                content = hashlib.sha256(part.numpy().tobytes()).hexdigest()
                ds_id = make_dataset_id(content, FORMAT, f"tokenizer={o.tokenizer}", f"seq_len={o.seq_len}", split)
                self._splits[split] = ByteDataset(part, o.seq_len, ds_id)
        return self._splits

    def train_data(self) -> ByteDataset:
        return self._data()["train"]

    def eval_data(self) -> ByteDataset:
        return self._data()["eval"]

    def logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.logits(model, batch["x"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["y"].reshape(-1))

    # ---- text, for `diloco sample` ----

    @property
    def context_len(self) -> int:
        return self.opts.seq_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _untie(model: nn.Module) -> None:
    """Give the output layer its own copy of tied input embeddings (one tensor per state-dict entry)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight is inp.weight:
        out.weight = nn.Parameter(inp.weight.detach().clone())
    model.config.tie_word_embeddings = False


def make_task(**options: Any) -> HFTask:
    return HFTask(parse_options(HFOptions, options, "hf"))


def to_pretrained(export_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Turn a `diloco export` file of an hf run into a directory `from_pretrained` loads."""
    from diloco.export import load_model

    model, meta = load_model(export_path)
    if meta["task"] != "hf":
        raise ConfigError(f"{export_path} is an export of task {meta['task']!r}, not of the hf task")
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    task = make_task(**meta["task_options"])
    if task.tokenizer.hf is not None:
        task.tokenizer.hf.save_pretrained(out)
    return out
