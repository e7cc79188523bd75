"""Streaming safetensors I/O: read tensor by tensor from memory-mapped shards, write shards as we go.

Reading opens the shard with ``safe_open`` per tensor: pages of a memory-mapped file count in the
process's RSS while the mapping lives, so keeping one mapping open for a whole shard would grow RSS to
the shard's size. Writing lays out every shard's header up front (all output shapes are known before a
byte is quantized) and then appends each tensor's bytes as it is produced, so only the tensor in hand
is ever in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from qserve.errors import QServeError
from qserve.models.loader import checkpoint_files

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from a shard's header without touching its data."""

    name: str
    file: Path
    dtype: str  # safetensors name: F32, BF16, I32, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)


class SourceCheckpoint:
    """The tensors of a checkpoint, indexed from shard headers (shapes and dtypes, no data read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        for file in checkpoint_files(path):
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        sl = f.get_slice(name)
                        self.tensors[name] = TensorInfo(name, file, sl.get_dtype(), tuple(sl.get_shape()))
            except QServeError:
                raise
            except Exception as e:  # safetensors raises its own error type for corrupt or truncated files
                raise QServeError(
                    f"cannot read {file.name}: {_one_line(e)} (corrupt or truncated safetensors?)"
                ) from None

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor; its shard is mapped only for the duration of the call."""
        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise QServeError(f"cannot read tensor {name} from {info.file.name}: {_one_line(e)}") from None

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.read(n) for n in names}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


@dataclass(frozen=True)
class OutputTensor:
    """A planned output tensor: name, dtype and shape fixed before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedWriter:
    """Writes planned tensors, in plan order, into safetensors shards of at most ``max_shard_bytes``.

    ``write`` must be called exactly once per planned tensor, in plan order, with the planned dtype and
    shape; each shard's header is written when its first tensor arrives.
    """

    def __init__(self, out_dir: Path, plan: list[OutputTensor], max_shard_bytes: int = 2 << 30) -> None:
        self.out_dir, self.plan = out_dir, plan
        self.shards: list[list[OutputTensor]] = [[]]
        size = 0
        for t in plan:
            if self.shards[-1] and size + t.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += t.nbytes
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._starts, first = set(), 0  # plan indices where a shard begins
        for shard in self.shards:
            self._starts.add(first)
            first += len(shard)
        self._next = 0  # index into plan
        self._shard = -1
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise RuntimeError(f"unplanned tensor {name}")
        want = self.plan[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want.name, want.dtype, want.shape):
            got = f"{name} {tensor.dtype} {tuple(tensor.shape)}"
            raise RuntimeError(f"writer expected {want.name} {want.dtype} {want.shape}, got {got}")
        if self._next in self._starts:
            self._open_next_shard()
        assert self._file is not None
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # raw little-endian bytes
        self._file.write(data.numpy().data)
        self._next += 1
        if self._next == len(self.plan):
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard += 1
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[self._shard]:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(self.out_dir / self.names[self._shard], "wb")  # noqa: SIM115 (closed in write/close)
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def close(self) -> None:
        """Finish: check every planned tensor was written and write the index for sharded output."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self.plan):
            raise RuntimeError(f"wrote {self._next} of {len(self.plan)} planned tensors")
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for t in self.plan)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def torch_dtype(name: str) -> torch.dtype:
    return _FROM_NAME[name]
