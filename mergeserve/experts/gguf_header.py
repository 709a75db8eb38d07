"""A GGUF file's header, read and checked against the file before anything is allocated.

transformers builds the model from the header's dimensions before it reads a tensor, and
gguf's own reader trusts every count it reads (an array longer than the file loops and
grows lists past the end). So this reads the header with every length bounded by the bytes
that remain, then checks each tensor's byte range against the file, its shape against the
model the metadata describes, and the values it dequantises to against the size limit.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mergeserve.experts.checkpoint import SUPPORTED_MODEL_TYPES, CheckpointError

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
KEPT_STRING_BYTES = 256  # longer metadata strings (chat templates) are skipped, not held
LOADED_BYTES_PER_VALUE = 4  # transformers dequantises every tensor to float32
LAYER = re.compile(r"^blk\.(\d+)\.")
OPTIONAL = re.compile(r"^output\.weight$|\.bias$")  # tied output; qwen2's attention biases


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the row length (ne0) first
    start: int  # byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    metadata: dict[str, object] = field(default_factory=dict)  # scalars and short strings
    lengths: dict[str, int] = field(default_factory=dict)  # array fields -> their length
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


class _Cursor:
    """Reads little-endian values from the file, never past the size it had when opened.
    (Plain reads, not a memory map: a file cut short under a map kills the process with SIGBUS.)"""

    def __init__(self, path: Path, f: BinaryIO) -> None:
        self.path, self.f, self.pos, self.size = path, f, 0, os.fstat(f.fileno()).st_size

    def skip(self, n: int, what: str) -> None:
        self._room(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def read(self, n: int, what: str) -> bytes:
        self._room(n, what)
        data = self.f.read(n)
        if len(data) < n:
            raise CheckpointError(f"{self.path}: {what}: the file was cut short while it was read")
        self.pos += n
        return data

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str | None:
        n = self.scalar("Q", what)
        if n <= KEPT_STRING_BYTES:
            return self.read(n, what).decode("utf-8", "replace")
        self.skip(n, what)
        return None

    def _room(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: {what} runs past the end of the file ({self.size} bytes)")


def read_header(path: Path) -> GGUFHeader:
    with path.open("rb") as f:
        return _parse(_Cursor(path, f))


def _parse(c: _Cursor) -> GGUFHeader:
    if c.size < 4 or c.read(4, "the magic") != b"GGUF":
        raise CheckpointError(f"{c.path}: not a GGUF file (no GGUF magic)")
    if (version := c.scalar("I", "the version")) not in (2, 3):
        raise CheckpointError(f"{c.path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = c.scalar("Q", "the tensor count"), c.scalar("Q", "the metadata count")
    header = GGUFHeader()
    _need(c, n_kv * 13, f"the metadata count {n_kv}")  # key length, type, one byte at least
    for _ in range(n_kv):
        key = c.string("a metadata key") or "<long key>"
        _read_value(c, header, key, c.scalar("I", key))
    _need(c, n_tensors * 24, f"the tensor count {n_tensors}")  # name length, dims, type, offset
    infos = [_tensor_info(c) for _ in range(n_tensors)]
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{c.path}: general.alignment={alignment!r} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    for name, shape, offset, nbytes in infos:
        _place(c, header, alignment, TensorInfo(name, shape, data_start + offset, nbytes), offset)
    return header


def _need(c: _Cursor, n: int, what: str) -> None:
    if c.pos + n > c.size:
        raise CheckpointError(f"{c.path}: {what} claims more than the file's {c.size} bytes hold")


def _read_value(c: _Cursor, header: GGUFHeader, key: str, vtype: int) -> None:
    if vtype in SCALARS:
        header.metadata[key] = c.scalar(SCALARS[vtype], key)
    elif vtype == STRING:
        header.metadata[key] = c.string(key)
    elif vtype == ARRAY:
        itype, n = c.scalar("I", key), c.scalar("Q", key)
        if itype in SCALARS:
            c.skip(n * struct.calcsize("<" + SCALARS[itype]), f"{key} ({n} items)")
        elif itype == STRING:
            _need(c, n * 8, f"{key} ({n} strings)")
            for _ in range(n):
                c.skip(c.scalar("Q", key), key)
        else:
            raise CheckpointError(f"{c.path}: {key}: arrays of type {itype} are not supported")
        header.lengths[key] = n
    else:
        raise CheckpointError(f"{c.path}: {key}: unknown metadata type {vtype}")


def _tensor_info(c: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = c.string("a tensor name") or "<long name>"
    n_dims = c.scalar("I", name)
    if not 1 <= n_dims <= MAX_DIMS:
        raise CheckpointError(f"{c.path}: tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    shape = tuple(c.scalar("Q", name) for _ in range(n_dims))
    raw_type, offset = c.scalar("I", name), c.scalar("Q", name)
    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise CheckpointError(f"{c.path}: tensor {name}: unknown type {raw_type}") from None
    if shape[0] % block:
        raise CheckpointError(f"{c.path}: tensor {name}: rows of {shape[0]} values do not fill blocks of {block}")
    return name, shape, offset, math.prod(shape) // block * type_bytes


def _place(c: _Cursor, header: GGUFHeader, alignment: int, t: TensorInfo, offset: int) -> None:
    if t.name in header.tensors:
        raise CheckpointError(f"{c.path}: tensor {t.name} is listed twice")
    if offset % alignment:
        raise CheckpointError(f"{c.path}: tensor {t.name}: offset {offset} is not a multiple of the alignment {alignment}")
    if t.start + t.nbytes > c.size:
        raise CheckpointError(
            f"{c.path}: tensor {t.name} {list(t.shape)} would take bytes {t.start}..{t.start + t.nbytes}, past the "
            f"end of the file ({c.size} bytes): the file is truncated or its header is wrong"
        )
    header.tensors[t.name] = t


def implied_config(path: Path, header: GGUFHeader) -> dict[str, int]:
    """The model the metadata describes, as transformers reads it: metadata key (less the
    architecture's prefix) -> value."""
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: general.architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

    def get(key: str, default: int | None = None) -> int:
        return _positive(path, header, f"{arch}.{key}", default)

    d, heads = get("embedding_length"), get("attention.head_count")
    config = {"embedding_length": d, "block_count": get("block_count"), "feed_forward_length": get("feed_forward_length"),
              "attention.head_count": heads, "attention.head_count_kv": get("attention.head_count_kv", heads),
              "vocab_size": get("vocab_size", header.lengths.get("tokenizer.ggml.tokens"))}
    # transformers takes llama/mistral's head_dim from rope.dimension_count, qwen2's from d / heads.
    if arch != "qwen2":
        config["rope.dimension_count"] = get("rope.dimension_count", d // heads)
    return config


def implied_shapes(config: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every tensor (GGUF names and order) of that model; output.weight and biases are optional."""
    d, ff, v = config["embedding_length"], config["feed_forward_length"], config["vocab_size"]
    hd = config.get("rope.dimension_count", d // config["attention.head_count"])
    q, kv = config["attention.head_count"] * hd, config["attention.head_count_kv"] * hd
    shapes = {"token_embd.weight": (d, v), "output_norm.weight": (d,), "output.weight": (d, v)}
    for n in range(config["block_count"]):
        p = f"blk.{n}."
        shapes |= {p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "attn_q.weight": (d, q),
                   p + "attn_k.weight": (d, kv), p + "attn_v.weight": (d, kv), p + "attn_output.weight": (q, d),
                   p + "ffn_gate.weight": (d, ff), p + "ffn_up.weight": (d, ff), p + "ffn_down.weight": (ff, d),
                   p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
    return shapes


def _positive(path: Path, header: GGUFHeader, key: str, default: int | None) -> int:
    value = header.metadata.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{path}: {key}={value!r}, a positive integer is needed")
    return value


def check_gguf(path: Path, max_bytes: int | None = None) -> GGUFHeader:
    """Refuse a GGUF file whose header does not describe what the file holds, or that would
    dequantise to more than `max_bytes`; the error names the tensor or metadata field."""
    header = read_header(path)
    config = implied_config(path, header)
    said = ", ".join(f"{header.metadata['general.architecture']}.{k}={v}" for k, v in config.items())
    layers = {int(m[1]) for name in header.tensors if (m := LAYER.match(name))}
    # Before the per-layer shapes are listed: a block_count the tensors do not back is refused here.
    if layers != set(range(len(layers))) or len(layers) != config["block_count"]:
        raise CheckpointError(f"{path}: the header says {said}, but the file holds tensors of {len(layers)} layers")
    for name, shape in implied_shapes(config).items():
        if name not in header.tensors:
            if not OPTIONAL.search(name):
                raise CheckpointError(f"{path}: tensor {name} is missing")
        elif header.tensors[name].shape != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(header.tensors[name].shape)}, "
                                  f"the header's {said} imply {list(shape)} (GGUF order)")
    values = sum(math.prod(t.shape) for t in header.tensors.values())
    if max_bytes is not None and values * LOADED_BYTES_PER_VALUE > max_bytes:
        raise CheckpointError(f"{path}: its tensors hold {values} values, {values * LOADED_BYTES_PER_VALUE} bytes "
                              f"once dequantised to float32, over the limit of {max_bytes} bytes per source file")
    return header
