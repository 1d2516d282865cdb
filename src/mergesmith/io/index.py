"""ModelIndex: where each tensor of a model lives, from file headers alone (no tensor data read).

safetensors headers are parsed and checked here once (size, JSON, dtypes, shapes, offsets in range, no overlaps),
so that a corrupt or lying file is refused before any work. Tensor data is then read lazily, one tensor or one
block of rows at a time, with `pread` at the offsets the header gave: row blocks are contiguous bytes, and the
memory holding them is freed with the block (a memory map would keep every touched page of a 12B model resident).
`pytorch_model*.bin` files load only through `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergesmith.errors import MergeError

# safetensors dtype code -> (torch dtype, bytes per element)
ST_DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    nbytes: int
    offset: int = -1  # absolute byte offset of the data in a safetensors file (-1: not safetensors)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: Path) -> Dict[str, Any]:
    """Parse and validate a safetensors header; returns {name: {dtype, shape, data_offsets}} (+ __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or n > size - 8:
                raise MergeError(f"{path}: safetensors header size {n} is impossible for a {size}-byte file "
                                 "(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeError(f"{path}: safetensors header is not valid JSON (corrupt file?)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise MergeError(f"{path}: tensor {name!r}: header entry is not an object")
        dt = info.get("dtype")
        if dt not in ST_DTYPES:
            raise MergeError(f"{path}: tensor {name!r}: unsupported dtype {dt!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise MergeError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        off = info.get("data_offsets")
        if (not isinstance(off, list) or len(off) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in off)):
            raise MergeError(f"{path}: tensor {name!r}: bad data_offsets {off!r}")
        b, e = off
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= b <= e <= data_len):
            raise MergeError(f"{path}: tensor {name!r}: data_offsets [{b}, {e}] lie outside the file's "
                             f"{data_len} data bytes (truncated download?)")
        if e - b != numel * ST_DTYPES[dt][1]:
            raise MergeError(f"{path}: tensor {name!r}: {e - b} bytes stored for shape {shape} of {dt}")
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise MergeError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (corrupt header)")
        if b1 > e0:
            raise MergeError(f"{path}: a gap of {b1 - e0} bytes between tensors {n0!r} and {n1!r} (corrupt header)")
    end = spans[-1][1] if spans else 0
    if (spans and spans[0][0] != 0) or end != data_len:
        raise MergeError(f"{path}: the header describes {end} data bytes but the file holds {data_len} "
                         "(truncated or corrupt)")
    return header


class _BinFile:
    """A pytorch_model*.bin loaded with weights_only=True (never arbitrary pickle code), memory-mapped."""

    def __init__(self, path: Path):
        try:
            self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a refusal
            raise MergeError(f"{path}: refused to load: it is not a plain weights file that loads with "
                             f"weights_only=True ({type(e).__name__}); convert it to safetensors") from None
        if not isinstance(self.sd, dict):
            raise MergeError(f"{path}: does not hold a state dict")


@dataclass
class ModelIndex:
    ref: str
    path: Path
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    config: Optional[Dict[str, Any]] = None
    lora: Any = None  # mergesmith.lora.LoraAdapter applied while reading (`model+adapter`)
    _handles: Dict[Path, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- reading ---------------------------------------------------------------------------------------------
    def _handle(self, file: Path):
        with self._lock:
            h = self._handles.get(file)
            if h is None:
                if file.suffix == ".safetensors":
                    h = os.open(file, os.O_RDONLY)
                else:
                    h = _BinFile(file)
                self._handles[file] = h
            return h

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None,
             take: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """Read one tensor (or rows [a, b) of it; or its leading sub-block `take`) in its stored dtype."""
        try:
            t = self._read(name, rows, take)
            if self.lora is not None:
                t = self._adapt(name, t, rows)
            return t
        except MergeError:
            raise
        except Exception as e:  # noqa: BLE001 - the file changed or lies in a way the header check missed
            if type(e).__name__ != "SafetensorError" and not isinstance(e, (OSError, RuntimeError)):
                raise
            raise MergeError(f"model {self.ref}: reading tensor {name} from {self.tensors[name].file} failed "
                             f"({str(e).splitlines()[0][:160]})") from None

    def _adapt(self, name: str, t: torch.Tensor, rows) -> torch.Tensor:
        """The LoRA-adapted value of a tensor (float32 when adapted: no rounding before the merge)."""
        ad = self.lora
        if name in ad.replace:
            r = ad.replace[name]
            r = r[rows[0]:rows[1]] if rows else r
            return r[tuple(slice(0, s) for s in t.shape)].clone() if t.dim() else r.clone()
        if name not in ad.factors:
            return t
        d = ad.delta(name, rows)
        return t.float() + d[tuple(slice(0, s) for s in t.shape)]

    def _read(self, name, rows, take) -> torch.Tensor:
        info = self.tensors[name]
        h = self._handle(info.file)
        if isinstance(h, _BinFile):
            t = h.sd[name]
            if take is not None:
                t = t[tuple(slice(0, s) for s in take)]
            return t[rows[0]:rows[1]].clone() if rows else t.clone()
        # safetensors: rows are contiguous bytes at a known offset; one pread into fresh (anonymous) memory, so
        # resident memory follows the tensors in flight, not the files' sizes (an mmap would keep touched pages)
        shape = info.shape
        n_rows = shape[0] if shape else 1
        a, b = rows if rows is not None else (0, n_rows)
        if take is not None:
            b = min(b, take[0])
        row_elems = info.numel // n_rows if n_rows else 0
        itemsize = info.nbytes // info.numel if info.numel else 1
        out = torch.empty(((b - a) * row_elems * itemsize,), dtype=torch.uint8)
        if out.numel():
            view = memoryview(out.numpy())
            done = 0
            while done < len(view):
                got = os.preadv(h, [view[done:]], info.offset + a * row_elems * itemsize + done)
                if got <= 0:
                    raise MergeError(f"model {self.ref}: {info.file} ends before tensor {name} does (truncated?)")
                done += got
        t = out.view(info.dtype).reshape((b - a,) + tuple(shape[1:])) if shape else out.view(info.dtype).reshape(())
        if take is not None and tuple(take[1:]) != tuple(shape[1:]):
            t = t[(slice(None),) + tuple(slice(0, s) for s in take[1:])].contiguous()
        return t

    def close(self) -> None:
        with self._lock:
            for h in self._handles.values():
                if isinstance(h, int):
                    os.close(h)
            self._handles.clear()


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: unreadable JSON ({e})") from None


def safe_member(folder: Path, name: str) -> Path:
    """The file `name` (from an index or a listing) of a model folder, refused when it lies outside the folder."""
    p = (folder / name).resolve()
    if folder.resolve() not in p.parents:
        raise MergeError(f"{folder}: index names a file outside the model folder: {name!r}")
    return p


def refuse_custom_code(folder: Path, command: str) -> None:
    """A folder whose config asks transformers to run its own Python (`auto_map`) is refused by `command`:
    mergesmith reads such a folder's weights and config, never its code."""
    for name in ("config.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise MergeError(f"{f}: 'auto_map' asks to run Python code shipped with the model; mergesmith never "
                             f"runs model code, so `{command}` cannot load it (merging its weights still works)")


def index_model(ref: str, path: Path) -> ModelIndex:
    """Index a model folder (sharded or single safetensors, or .bin) or a single weights file."""
    idx = ModelIndex(ref=ref, path=path)
    files: List[Path]
    if path.is_file():
        files = [path]
        folder = path.parent
    else:
        folder = path
        st_index = path / "model.safetensors.index.json"
        bin_index = path / "pytorch_model.bin.index.json"
        if st_index.exists():
            wm = _load_json(st_index).get("weight_map")
            if not isinstance(wm, dict):
                raise MergeError(f"{st_index}: no weight_map")
            files = sorted({safe_member(path, f) for f in wm.values()})
        elif list(path.glob("*.safetensors")):
            files = sorted(path.glob("*.safetensors"))
        elif bin_index.exists():
            wm = _load_json(bin_index).get("weight_map") or {}
            files = sorted({safe_member(path, f) for f in wm.values()})
        elif (path / "pytorch_model.bin").exists():
            files = [path / "pytorch_model.bin"]
        else:
            raise MergeError(f"model {ref}: no weights in {path} (expected *.safetensors or pytorch_model.bin)")
        for f in files:
            if not f.exists():
                raise MergeError(f"model {ref}: {f.name} is listed in the index but missing (incomplete download?)")
    if (folder / "config.json").exists():
        cfg = _load_json(folder / "config.json")
        idx.config = cfg if isinstance(cfg, dict) else None
    for f in files:
        if f.suffix == ".safetensors":
            header = read_safetensors_header(f)
            with open(f, "rb") as fh:
                start = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dt, size = ST_DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                b, e = info["data_offsets"]
                idx.tensors[name] = TensorInfo(name, f, dt, shape, e - b, start + b)
        else:
            sd = idx._handle(f).sd
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    idx.tensors[name] = TensorInfo(name, f, t.dtype, tuple(t.shape), t.numel() * t.element_size())
    if not idx.tensors:
        raise MergeError(f"model {ref}: {path} holds no tensors")
    return idx


def model_folder(idx: ModelIndex) -> Path:
    return idx.path if idx.path.is_dir() else idx.path.parent


def file_size(path: Path) -> int:
    return os.stat(path).st_size
