"""The default task: a byte-level GPT trained on the source of Python's standard library.

The corpus needs no download and no tokenizer: every `*.py` file under the running Python's
stdlib directory, in sorted relative-path order, joined with newlines and cut at `corpus_mb` MiB.
Different Python versions ship different sources, so the corpus's sha256 is part of the
`dataset_id`; workers can compare ids to check they train on the same bytes.

The model is nanoGPT-shaped (learned positions, pre-LayerNorm blocks, GELU MLP) with an untied
lm_head, because the rest of the system assumes one tensor per state_dict entry.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diloco.errors import ConfigError
from diloco.tasks import check, check_ids, make_dataset_id, parse_options

FORMAT = "bytes-v1"
VOCAB = 256
MIN_CORPUS_BYTES = 64 * 1024
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class GPTOptions:
    n_layer: int = 2
    n_head: int = 4
    # sized so one AdamW step at batch 16 takes ~25 ms on one CPU thread (~40 ms at 128/128)
    n_embd: int = 96
    seq_len: int = 64
    corpus_mb: float = 4.0
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "seq_len"):
            check(getattr(self, key) >= 1, "gpt", f"option {key!r} must be >= 1")
        check(self.n_embd % self.n_head == 0, "gpt",
              f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        check(self.corpus_mb > 0, "gpt", "option 'corpus_mb' must be > 0")
        check(0 < self.eval_fraction < 1, "gpt", "option 'eval_fraction' must be between 0 and 1")


# ---- data ----

def read_corpus(max_bytes: int) -> bytes:
    """The stdlib's .py files, sorted by relative POSIX path, joined by b"\\n", cut at max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"task 'gpt': Python's stdlib directory {root} does not exist; "
                          "use a Python installation that ships its .py sources")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune: site-packages can be huge
        paths += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    chunks, size = [], 0
    for rel in sorted(paths):
        if size >= max_bytes:
            break
        chunk = (root / rel).read_bytes() + b"\n"
        chunks.append(chunk)
        size += len(chunk)
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < MIN_CORPUS_BYTES:
        raise ConfigError(f"task 'gpt': found only {len(corpus)} bytes of .py sources under {root}; "
                          "this Python installation lacks its stdlib sources")
    return corpus


class ByteDataset:
    """Non-overlapping windows of seq_len + 1 bytes over one split of the corpus."""

    def __init__(self, data: torch.Tensor, seq_len: int, dataset_id: str) -> None:
        self.data = data  # uint8, 1-D
        self.seq_len = seq_len
        self.tokens_per_sample = seq_len
        self.dataset_id = dataset_id
        self.offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def batch(self, ids) -> dict[str, torch.Tensor]:
        idx = check_ids(ids, len(self))
        windows = self.data[idx[:, None] * self.seq_len + self.offsets].long()
        return {"x": windows[:, :-1].contiguous(), "y": windows[:, 1:].contiguous()}


# ---- model ----

class SelfAttention(nn.Module):
    def __init__(self, o: GPTOptions) -> None:
        super().__init__()
        self.n_head = o.n_head
        self.qkv = nn.Linear(o.n_embd, 3 * o.n_embd)
        self.proj = nn.Linear(o.n_embd, o.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, o: GPTOptions) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(o.n_embd)
        self.attn = SelfAttention(o)
        self.ln2 = nn.LayerNorm(o.n_embd)
        self.fc = nn.Linear(o.n_embd, 4 * o.n_embd)
        self.proj = nn.Linear(4 * o.n_embd, o.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, o: GPTOptions) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, o.n_embd)
        self.pos_emb = nn.Embedding(o.seq_len, o.n_embd)
        self.blocks = nn.ModuleList(Block(o) for _ in range(o.n_layer))
        self.ln_f = nn.LayerNorm(o.n_embd)
        self.lm_head = nn.Linear(o.n_embd, VOCAB, bias=False)
        self.apply(self._init)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance
        # from growing with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * o.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---- task ----

class GPTTask:
    name = "gpt"
    # Run settings used when the user gives none (the corpus holds thousands of units of 16 samples).
    defaults: ClassVar[dict[str, Any]] = {"sync_every": 500, "batch_size": 16}

    def __init__(self, opts: GPTOptions) -> None:
        self.opts = opts
        self.options: dict[str, Any] = asdict(opts)
        self._splits: dict[str, ByteDataset] | None = None

    def _data(self) -> dict[str, ByteDataset]:
        if self._splits is None:
            o = self.opts
            corpus = read_corpus(int(o.corpus_mb * 2**20))
            content = hashlib.sha256(corpus).hexdigest()
            data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
            cut = len(data) - int(len(data) * o.eval_fraction)
            bounds = {"train": (0, cut), "eval": (cut, len(data))}
            self._splits = {}
            for split, (lo, hi) in bounds.items():
                if hi - lo < o.seq_len + 1:
                    raise ConfigError(f"task 'gpt': the {split} split has {hi - lo} bytes, fewer than one "
                                      f"sample of seq_len={o.seq_len}; raise corpus_mb or eval_fraction")
                ds_id = make_dataset_id(content, FORMAT, f"seq_len={o.seq_len}", f"{split}={lo}:{hi}")
                self._splits[split] = ByteDataset(data[lo:hi], o.seq_len, ds_id)
        return self._splits

    def build_model(self) -> nn.Module:
        return GPT(self.opts)

    def train_data(self) -> ByteDataset:
        return self._data()["train"]

    def eval_data(self) -> ByteDataset:
        return self._data()["eval"]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["x"])
        return F.cross_entropy(logits.view(-1, VOCAB), batch["y"].view(-1))

    # ---- text, for `diloco sample` (diloco/sample.py) ----

    @property
    def context_len(self) -> int:
        return self.opts.seq_len

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(ids)


def make_task(**options: Any) -> GPTTask:
    return GPTTask(parse_options(GPTOptions, options, "gpt"))
