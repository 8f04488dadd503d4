"""topk: chunked top-k sparsification with 2-bit values, about 0.028 bytes per parameter.

The slice is cut into chunks of 4096 elements (the last one may be shorter, of length L). Each chunk
keeps its k = max(1, round(density * L)) largest-magnitude elements (61 of 4096 at the default
density 0.015). Their magnitudes are split into two groups by the optimal 1-D 2-means split of the
sorted magnitudes; each group is sent as its mean (s1 <= s2), so an element decodes to +-s1 or +-s2.
Everything else decodes to 0. Error feedback lives in the worker: decode(encode(x)) is exactly what
the aggregator sees, so the worker keeps x - decode(encode(x)) for its next round.

With K the total of the chunks' k and C the number of chunks, the parts are
`idx` uint8 [ceil(12 K / 8)]: each kept element's index within its chunk, 12 bits, chunk by chunk,
    strictly increasing within a chunk;
`code` uint8 [ceil(K / 4)]: 2 bits per kept element in the same order, bit 0 the sign (1 = negative),
    bit 1 the level (1 = s2);
`scale` float32 [2 C]: s1, s2 of each chunk, finite and 0 <= s1 <= s2.
bytes = ceil(1.5 K) + ceil(K / 4) + 8 C.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import torch

from diloco.codecs import Codec, bitpack, expect_part
from diloco.codecs.int8 import check_scales
from diloco.errors import BadShard, ConfigError

CHUNK = 4096  # 64 x 64; indices within a chunk fit 12 bits
_ROWS_PER_THREAD = 256  # about 1M elements: below that a thread costs more than it saves


class TopK(Codec):
    name = "topk"
    parts = ("idx", "code", "scale")
    sparse: ClassVar[bool] = True
    option_types: ClassVar[dict[str, tuple[type, ...]]] = {"density": (float, int), "feedback_decay": (float, int)}

    def __init__(self, density: float = 0.015, feedback_decay: float = 1.0) -> None:
        for name, value in (("density", density), ("feedback_decay", feedback_decay)):
            if not (isinstance(value, (float, int)) and not isinstance(value, bool)
                    and math.isfinite(value) and 0 < value <= 1):
                raise ConfigError(f"topk option {name!r} must be a number in (0, 1], got {value!r}")
        self.density = float(density)
        self.feedback_decay = float(feedback_decay)

    def _k(self, length: int) -> int:
        return max(1, min(length, math.floor(self.density * length + 0.5)))

    def _groups(self, numel: int) -> list[tuple[int, int, int, int]]:
        """(offset, chunks, chunk length, k) of the full chunks and of the short last chunk."""
        full, tail = divmod(numel, CHUNK)
        groups = [(0, full, CHUNK, self._k(CHUNK))] if full else []
        return [*groups, (full * CHUNK, 1, tail, self._k(tail))] if tail else groups

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(torch.float32)
        idx, codes, scales = [], [], []
        for offset, chunks, length, k in self._groups(x.numel()):
            rows = x[offset:offset + chunks * length].view(chunks, length)
            i = _largest(rows.abs(), k)
            code, s = _quantize(rows.gather(1, i))
            idx.append(i.reshape(-1))
            codes.append(code.reshape(-1))
            scales.append(s.reshape(-1))
        if not idx:  # numel 0
            idx = codes = [torch.zeros(0, dtype=torch.int64, device=x.device)]
            scales = [torch.zeros(0, dtype=torch.float32, device=x.device)]
        return {"idx": bitpack.pack(torch.cat(idx), 12), "code": bitpack.pack(torch.cat(codes), 2),
                "scale": torch.cat(scales)}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        positions, values = self.decode_sparse(parts, numel)
        out = torch.zeros(numel, dtype=torch.float32, device=values.device)
        out[positions] = values
        return out

    def decode_sparse(self, parts: dict[str, torch.Tensor], numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self._groups(numel)
        total = sum(chunks * k for _, chunks, _, k in groups)
        scale = expect_part(parts, "scale", torch.float32, 2 * sum(g[1] for g in groups)).view(-1, 2)
        check_scales(scale)
        if bool((scale[:, 0] > scale[:, 1]).any()):
            raise BadShard("part 'scale' has a chunk whose s1 exceeds its s2")
        idx = bitpack.unpack(parts.get("idx"), total, 12, "idx")
        code = bitpack.unpack(parts.get("code"), total, 2, "code").long()
        positions, chunk_of = [], []
        start = first_chunk = 0
        for offset, chunks, length, k in groups:
            i = idx[start:start + chunks * k].view(chunks, k)
            # 12 bits cannot exceed a full chunk: only the short last chunk needs the range check
            if length < CHUNK and bool((i >= length).any()):
                raise BadShard(f"part 'idx' holds an index >= {length}, the length of its chunk")
            step = i[:, 1:] - i[:, :-1]
            if bool((step <= 0).any()):  # one test on the good path; the reason only on the bad one
                what = "repeats an index" if bool((step == 0).any()) else "is not increasing"
                raise BadShard(f"part 'idx' {what} within a chunk")
            c = torch.arange(chunks, device=idx.device)[:, None]
            positions.append((offset + c * length + i).reshape(-1))
            chunk_of.append((first_chunk + c).expand(chunks, k).reshape(-1))
            start, first_chunk = start + chunks * k, first_chunk + chunks
        if not positions:  # numel 0
            return torch.zeros(0, dtype=torch.int64, device=scale.device), scale.new_zeros(0)
        level = scale[torch.cat(chunk_of), code >> 1]
        return torch.cat(positions), torch.where((code & 1) == 1, -level, level)

    def max_bytes(self, numel: int) -> int:
        groups = self._groups(numel)
        total = sum(chunks * k for _, chunks, _, k in groups)
        return bitpack.packed_len(total, 12) + bitpack.packed_len(total, 2) + 8 * sum(g[1] for g in groups)


def _largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of mag [rows, length], the indices of its k largest values, ascending.

    On the CPU numpy's introselect (argpartition) is about 4x faster per core than torch.topk for rows
    of 4096, and numpy sorts small rows about 10x faster than torch; the selection was most of topk's
    encode time (docs/benchmarks.md, Codecs). numpy releases the GIL there, so large slices are split
    over torch's thread count. Ties may be broken differently on CPU and GPU, which is harmless:
    either is a valid top-k, and the worker's error feedback decodes what was sent.
    """
    if mag.device.type != "cpu":
        return mag.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    rows, length = mag.shape

    def pick(block: np.ndarray) -> np.ndarray:
        return np.sort(np.argpartition(block, length - k, axis=1)[:, length - k:], axis=1)

    threads = min(torch.get_num_threads(), rows // _ROWS_PER_THREAD)
    if threads <= 1:
        return torch.from_numpy(pick(mag.numpy()))
    with ThreadPoolExecutor(threads) as pool:
        return torch.from_numpy(np.concatenate(list(pool.map(pick, np.array_split(mag.numpy(), threads)))))


def _sort_rows(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row of m sorted ascending; numpy on the CPU, as in `_largest`."""
    if m.device.type != "cpu":
        return m.sort(dim=1)
    order = np.argsort(m.numpy(), axis=1)
    return torch.from_numpy(np.take_along_axis(m.numpy(), order, axis=1)), torch.from_numpy(order)


def _quantize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of v [rows, k]: 2-bit codes [rows, k] and the levels (s1, s2) [rows, 2] fp32.

    The magnitudes, sorted, are split where the two groups' squared error around their means is
    least (for sorted 1-D data the best 2-means split is contiguous); math in fp64, so squares of
    magnitudes up to fp32's maximum neither overflow nor lose the split to cancellation.
    """
    rows, k = v.shape
    m, order = _sort_rows(v.abs().to(torch.float64))
    low_sum = torch.cat([torch.zeros_like(m[:, :1]), torch.cumsum(m[:, :-1], dim=1)], dim=1)  # j smallest, j < k
    high_sum = m.sum(dim=1, keepdim=True) - low_sum
    j = torch.arange(k, dtype=torch.float64, device=v.device)
    # minimising the squared error = maximising sum_low^2 / j + sum_high^2 / (k - j)
    gain = low_sum.square() / j.clamp(min=1) + high_sum.square() / (k - j)
    split = gain.argmax(dim=1, keepdim=True)
    s2 = high_sum.gather(1, split) / (k - split)
    s1 = torch.where(split > 0, low_sum.gather(1, split) / split.clamp(min=1), s2).minimum(s2)  # rounding
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=v.device).expand(rows, k))
    code = (rank >= split).to(torch.int64) * 2 + (v < 0).to(torch.int64)
    return code, torch.cat([s1, s2], dim=1).to(torch.float32)
