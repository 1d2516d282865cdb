"""ModelIndex: where each tensor of a model lives, from file headers alone (no tensor data read).

safetensors headers are parsed and checked here once (size, JSON, dtypes, shapes, offsets in range, no overlaps),
so that a corrupt or lying file is refused before any work. Tensor data is then read lazily, one tensor or one
block of rows at a time, with `pread` at the offsets the header gave: row blocks are contiguous bytes, and the
memory holding them is freed with the block (a memory map would keep every touched page of a 12B model resident).
`pytorch_model*.bin` files load only through `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergesmith.errors import MergeError

# safetensors dtype code -> (torch dtype, bytes per element)
ST_DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# FP8 checkpoints are quantized from bfloat16: their tensors stand for bfloat16 ones (see TensorInfo)
FP8_STANDS_FOR = torch.bfloat16
SCALE_SUFFIX = "_scale_inv"  # `X.weight_scale_inv` holds the block scales of the FP8 `X.weight`
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_JSON = 64 * 1024 * 1024  # config, index and tokenizer JSON: the largest real ones are a few tens of MB
MAX_DIMS, MAX_DIM = 16, 1 << 48  # a tensor's rank and extent (a zero-size tensor could claim any other extent)


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is. `dtype` is what the tensor stands for: its stored dtype, except for
    FP8 tensors, which stand for bfloat16 (the dtype an output takes when the recipe names none: an FP8 input
    never makes an FP8 output). `ModelIndex.read` gives the stored dtype, except for FP8 tensors, which read as
    float32: the FP8 values times their block scales when the model has `*_scale_inv` tensors (one rounding),
    else the FP8 values themselves (exact)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    nbytes: int  # bytes in the file
    offset: int = -1  # absolute byte offset of the data in a safetensors file (-1: not safetensors)
    stored: Optional[torch.dtype] = None  # the dtype in the file, where it is not `dtype` (FP8)
    scale: Optional["TensorInfo"] = None  # an FP8 weight's `*_scale_inv` tensor: one scale per block
    block: Tuple[int, int] = (128, 128)  # the rows and columns of a scale's block

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file: a FIFO would block the open (hence
    O_NONBLOCK), a device would never end, a folder is no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MergeError(f"{path}: not a regular file (a folder, FIFO or device); refused")
    return fd


def _read_all(fd: int, n: int, offset: int = 0) -> bytes:
    """Up to `n` bytes at `offset` (fewer only at the end of the file)."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_capped(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file, refused (before reading) when larger than `limit`."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw = _read_all(fd, limit + 1) if size <= limit else b""
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if size > limit or len(raw) > limit:
        raise MergeError(
            f"{path}: {max(size, len(raw)) / 2**20:.0f} MiB is too large for a {what} "
            f"(at most {limit / 2**20:g} MiB is read); refused"
        )
    return raw


def read_json(path: Path) -> Any:
    """A JSON file, size-capped (MAX_JSON); any flaw is one line."""
    raw = read_capped(path, MAX_JSON, "JSON file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise MergeError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise MergeError(f"{path}: JSON nested too deeply") from None


def read_json_object(path: Path) -> Dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise MergeError(f"{path}: holds a JSON {type(data).__name__}, not an object ({{...}}); the file is corrupt")
    return data


def _hub_blobs(root: Path) -> Optional[Path]:
    """`.../models--org--name/blobs` when the resolved folder `root` is (inside) a Hugging Face cache snapshot,
    `models--org--name/snapshots/<commit>/`: the cache keeps a snapshot's files there, linked from the snapshot."""
    for a in (root, *root.parents):
        if a.parent.name == "snapshots" and a.parent.parent.name.startswith("models--"):
            return a.parent.parent / "blobs"
    return None


def lies_inside(folder: Path, target: Path) -> bool:
    """Whether the resolved path `target` belongs to the model folder `folder`: inside it, or, for a Hugging Face
    cache snapshot, one of its repository's blobs (never another repository's)."""
    root = folder.resolve()
    if root in target.parents:
        return True
    blobs = _hub_blobs(root)
    return blobs is not None and target.parent == blobs


def safe_member(folder: Path, name: str) -> Path:
    """The file `name` (from an index or a listing) of a model folder, resolved: a regular file inside the folder
    (or a Hub cache link to its repository's blobs). Refused: a name with `..` or absolute, a link leading
    elsewhere, a folder, FIFO or device, a missing file."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or ".." in parts or parts[0] == "/" or "\\" in name or "\0" in name:
        raise MergeError(
            f"{folder}: names the file {str(name)[:80]!r}, which is not a file name inside the model folder; refused"
        )
    try:
        p = (folder.resolve() / name).resolve(strict=True)
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise MergeError(f"{folder}: {name} is missing (incomplete download?)") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
        raise MergeError(f"{folder}: cannot open {name} ({getattr(e, 'strerror', None) or e})") from None
    if not lies_inside(folder, p):
        raise MergeError(
            f"{folder}: {name} leads outside the model folder (to {p}); refused (if that file is "
            "yours, put a copy of it in the folder instead of the link)"
        )
    if not stat.S_ISREG(mode):
        raise MergeError(f"{folder}: {name} is not a regular file (a folder, FIFO or device); refused")
    return p


def member_json(folder: Path, name: str) -> Dict[str, Any]:
    """A JSON object file of a model folder, through safe_member and read_json_object."""
    return read_json_object(safe_member(folder, name))


def has_member(folder: Path, name: str) -> bool:
    """Whether the folder has an entry `name` (a dangling link counts: safe_member then says what is wrong)."""
    return os.path.lexists(folder / name)


def load_pickled_weights(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """A `.bin` state dict through torch.load(weights_only=True): pickled code never runs, and anything else
    than a plain {name: tensor} file is one line."""
    try:
        with warnings.catch_warnings():  # torch warns (two more lines) about pickle protocols it then refuses
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a refusal
        raise MergeError(
            f"{path}: refused to load: it is not a plain weights file that loads with "
            f"weights_only=True ({type(e).__name__}); convert it to safetensors"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise MergeError(f"{path}: does not hold a state dict ({{tensor name: tensor}})")
    return sd


def _header_bytes(path: Path) -> Tuple[int, bytes]:
    """(file size, the header's JSON bytes) of a safetensors file; the length field is checked before reading."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise MergeError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or n > size - 8:
            raise MergeError(
                f"{path}: safetensors header size {n} is impossible for a {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        raw = _read_all(fd, n, 8)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) < n:
        raise MergeError(f"{path}: the file ends inside its safetensors header (truncated)")
    return size, raw


def _check_entry(path: Path, name: str, info: Any, data_len: int) -> Tuple[int, int]:
    """One tensor's header entry checked against the file: its (begin, end) data offsets."""
    if not isinstance(info, dict):
        raise MergeError(f"{path}: tensor {name!r}: header entry is not an object")
    dt = info.get("dtype")
    if dt not in ST_DTYPES:
        raise MergeError(f"{path}: tensor {name!r}: unsupported dtype {str(dt)[:40]!r}")
    shape = info.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
    ):
        raise MergeError(f"{path}: tensor {name!r}: bad shape {str(shape)[:80]}")
    off = info.get("data_offsets")
    if (
        not isinstance(off, list)
        or len(off) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in off)
    ):
        raise MergeError(f"{path}: tensor {name!r}: bad data_offsets {str(off)[:80]}")
    b, e = off
    numel = 1
    for s in shape:
        numel *= s
    if not (0 <= b <= e <= data_len):
        raise MergeError(
            f"{path}: tensor {name!r}: data_offsets [{b}, {e}] lie outside the file's "
            f"{data_len} data bytes (truncated download?)"
        )
    if e - b != numel * ST_DTYPES[dt][1]:
        raise MergeError(f"{path}: tensor {name!r}: {e - b} bytes stored for shape {shape} of {dt}")
    return b, e


def read_safetensors_header(path: Path) -> Dict[str, Any]:
    """Parse and validate a safetensors header; returns {name: {dtype, shape, data_offsets}} (+ __metadata__)."""
    return _parse_header(path)[0]


def _parse_header(path: Path) -> Tuple[Dict[str, Any], int]:
    """read_safetensors_header's header, and the file offset where the tensor data begins."""
    size, raw = _header_bytes(path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MergeError(f"{path}: safetensors header is not valid JSON (corrupt file?)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - len(raw)
    spans = sorted(
        (*_check_entry(path, name, info, data_len), name) for name, info in header.items() if name != "__metadata__"
    )
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise MergeError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (corrupt header)")
        if b1 > e0:
            raise MergeError(f"{path}: a gap of {b1 - e0} bytes between tensors {n0!r} and {n1!r} (corrupt header)")
    end = spans[-1][1] if spans else 0
    if (spans and spans[0][0] != 0) or end != data_len:
        raise MergeError(
            f"{path}: the header describes {end} data bytes but the file holds {data_len} (truncated or corrupt)"
        )
    return header, 8 + len(raw)


class _BinFile:
    """A pytorch_model*.bin loaded with weights_only=True (never arbitrary pickle code), memory-mapped."""

    def __init__(self, path: Path):
        self.sd = load_pickled_weights(path, mmap=True)


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
    def _handle(self, file: Path, safetensors: bool):
        """An open file: a descriptor of a safetensors file, or a loaded .bin (its format is the listed name's,
        as a Hub cache blob has no suffix)."""
        with self._lock:
            h = self._handles.get(file)
            if h is None:
                h = open_regular(file) if safetensors else _BinFile(file)
                self._handles[file] = h
            return h

    def read(
        self, name: str, rows: Optional[Tuple[int, int]] = None, take: Optional[Tuple[int, ...]] = None
    ) -> torch.Tensor:
        """Read one tensor (or rows [a, b) of it; or its leading sub-block `take`) in its stored dtype (FP8 tensors:
        float32, see TensorInfo)."""
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
            raise MergeError(
                f"model {self.ref}: reading tensor {name} from {self.tensors[name].file} failed "
                f"({str(e).splitlines()[0][:160]})"
            ) from None

    def prefetch(self, name: str, rows: Optional[Tuple[int, int]] = None) -> None:
        """Ask the kernel to start reading a tensor's bytes (or rows [a, b)) now (posix_fadvise WILLNEED), so a
        later `read` finds them in the page cache: the disk works while the cores compute. Advice only: it never
        fails."""
        info = self.tensors.get(name)
        if info is None or info.offset < 0 or not hasattr(os, "posix_fadvise"):
            return
        n_rows = info.shape[0] if info.shape else 1
        a, b = rows if rows is not None else (0, n_rows)
        row_bytes = info.nbytes // n_rows if n_rows else 0
        try:
            os.posix_fadvise(self._handle(info.file, True), info.offset + a * row_bytes, (b - a) * row_bytes,
                             os.POSIX_FADV_WILLNEED)  # fmt: skip
        except OSError:
            pass

    def _adapt(self, name: str, t: torch.Tensor, rows) -> torch.Tensor:
        """The LoRA-adapted value of a tensor (float32 when adapted: no rounding before the merge)."""
        ad = self.lora
        if name in ad.replace:
            r = ad.replace[name]
            r = r[rows[0] : rows[1]] if rows else r
            return r[tuple(slice(0, s) for s in t.shape)].clone() if t.dim() else r.clone()
        if name not in ad.factors:
            return t
        d = ad.delta(name, rows)
        return t.float() + d[tuple(slice(0, s) for s in t.shape)]

    def _read(self, name, rows, take) -> torch.Tensor:
        info = self.tensors[name]
        if info.scale is not None:
            return self._dequantized(info, rows, take)
        t = self._raw(info, rows, take)
        return t.float() if info.stored is not None else t

    def _dequantized(self, info: TensorInfo, rows, take) -> torch.Tensor:
        """An FP8 weight times its block scales, in float32: the scales of rows [a, b) are scale rows
        a // bs .. ceil(b / bs), each repeated over its block's rows and columns."""
        a, b = rows if rows is not None else (0, info.shape[0])
        if take is not None:
            b = min(b, take[0])
        q = self._raw(info, (a, b), None).float()
        br, bc = info.block
        s = self._raw(info.scale, (a // br, -(-b // br)), None).float()
        s = s.repeat_interleave(br, dim=0)[a - a // br * br :][: b - a].repeat_interleave(bc, dim=1)[:, : q.shape[1]]
        out = q.mul_(s)
        if take is not None and tuple(take[1:]) != tuple(info.shape[1:]):
            out = out[(slice(None),) + tuple(slice(0, n) for n in take[1:])].contiguous()
        return out

    def _raw(self, info: TensorInfo, rows, take) -> torch.Tensor:
        """A tensor's stored values (rows [a, b), or its leading sub-block `take`)."""
        name = info.name
        h = self._handle(info.file, info.offset >= 0)
        if isinstance(h, _BinFile):
            t = h.sd[name]
            if take is not None:
                t = t[tuple(slice(0, s) for s in take)]
            return t[rows[0] : rows[1]].clone() if rows else t.clone()
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
        dt = info.stored or info.dtype
        t = out.view(dt).reshape((b - a,) + tuple(shape[1:])) if shape else out.view(dt).reshape(())
        if take is not None and tuple(take[1:]) != tuple(shape[1:]):
            t = t[(slice(None),) + tuple(slice(0, s) for s in take[1:])].contiguous()
        return t

    def close(self) -> None:
        with self._lock:
            for h in self._handles.values():
                if isinstance(h, int):
                    os.close(h)
            self._handles.clear()


def refuse_custom_code(folder: Path, command: str) -> None:
    """A folder whose config asks transformers to run its own Python (`auto_map`) is refused by `command`:
    mergesmith reads such a folder's weights and config, never its code."""
    for name in ("config.json", "tokenizer_config.json"):
        if not has_member(folder, name):
            continue
        try:
            data = member_json(folder, name)
        except MergeError:
            continue
        if data.get("auto_map"):
            raise MergeError(
                f"{folder / name}: 'auto_map' asks to run Python code shipped with the model; mergesmith "
                f"never runs model code, so `{command}` cannot load it (merging its weights still works)"
            )


# config.json fields mergesmith reads itself, with the types they must have
_CONFIG_FIELDS = {
    "hidden_size": "a whole number",
    "num_hidden_layers": "a whole number",
    "vocab_size": "a whole number",
    "tie_word_embeddings": "true or false",
    "architectures": "a list of class names",
}


def _config_field_ok(key: str, v: Any) -> bool:
    if v is None:
        return True
    if key == "tie_word_embeddings":
        return isinstance(v, bool)
    if key == "architectures":
        return isinstance(v, list) and all(isinstance(a, str) for a in v)
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_config(folder: Path) -> Optional[Dict[str, Any]]:
    """A model folder's config.json (None without one), refused when it is not an object or a field mergesmith
    uses has the wrong type."""
    if not has_member(folder, "config.json"):
        return None
    cfg = member_json(folder, "config.json")
    for key, want in _CONFIG_FIELDS.items():
        if not _config_field_ok(key, cfg.get(key)):
            raise MergeError(
                f"{folder / 'config.json'}: '{key}' is {json.dumps(cfg[key])[:60]}, not {want}; the config is corrupt"
            )
    return cfg


def _weight_map(folder: Path, index: str, suffix: str) -> Dict[str, str]:
    """{tensor: file name} of an index file, each value a `suffix` file name."""
    wm = member_json(folder, index).get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise MergeError(f"{folder / index}: no 'weight_map' (an object of tensor name -> file name)")
    for tensor, fname in wm.items():
        if not isinstance(fname, str) or not fname.endswith(suffix) or fname == index:
            raise MergeError(
                f"{folder / index}: tensor {tensor!r} maps to {json.dumps(fname)[:80]}, which is not a "
                f"{suffix} file name; the index is corrupt"
            )
    return wm


# (name as listed, resolved path, whether it is safetensors): a Hub cache blob has neither the name nor the suffix
WeightsFile = Tuple[str, Path, bool]


def _indexed(folder: Path, index: str, suffix: str) -> Tuple[List[WeightsFile], Dict[str, str]]:
    wm = _weight_map(folder, index, suffix)
    return [(f, safe_member(folder, f), suffix == ".safetensors") for f in sorted(set(wm.values()))], wm


def _weight_files(ref: str, folder: Path) -> Tuple[List[WeightsFile], Optional[Dict[str, str]]]:
    """The weights files of a model folder in name order, each checked by safe_member, and {tensor: file name}
    when an index maps them."""
    if has_member(folder, "model.safetensors.index.json"):
        return _indexed(folder, "model.safetensors.index.json", ".safetensors")
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names and has_member(folder, "pytorch_model.bin.index.json"):
        return _indexed(folder, "pytorch_model.bin.index.json", ".bin")
    if not names and has_member(folder, "pytorch_model.bin"):
        names = ["pytorch_model.bin"]
    if not names:
        raise MergeError(f"model {ref}: no weights in {folder} (expected *.safetensors or pytorch_model.bin)")
    return [(n, safe_member(folder, n), n.endswith(".safetensors")) for n in names], None


def _info(name: str, f: Path, dtype: torch.dtype, shape: Tuple[int, ...], nbytes: int, offset: int = -1) -> TensorInfo:
    if dtype in FP8:
        return TensorInfo(name, f, FP8_STANDS_FOR, shape, nbytes, offset, stored=dtype)
    return TensorInfo(name, f, dtype, shape, nbytes, offset)


def _tensors_of(idx: ModelIndex, f: Path, safetensors: bool) -> List[TensorInfo]:
    if safetensors:
        header, start = _parse_header(f)
        return [
            _info(
                name,
                f,
                ST_DTYPES[info["dtype"]][0],
                tuple(info["shape"]),
                info["data_offsets"][1] - info["data_offsets"][0],
                start + info["data_offsets"][0],
            )
            for name, info in header.items()
            if name != "__metadata__"
        ]
    sd = idx._handle(f, False).sd
    return [
        _info(n, f, t.dtype, tuple(t.shape), t.numel() * t.element_size())
        for n, t in sd.items()
        if isinstance(t, torch.Tensor)
    ]


def _add_files(idx: ModelIndex, files: List[WeightsFile]) -> Dict[str, str]:
    """Index the tensors of every file; a tensor name in two files is refused. Returns {tensor: file name}."""
    where: Dict[str, str] = {}
    for name, f, safetensors in files:
        for t in _tensors_of(idx, f, safetensors):
            if t.name in where:
                raise MergeError(
                    f"model {idx.ref}: tensor {t.name} is in both {where[t.name]} and {name}; which one "
                    "is meant? (corrupt or mixed download)"
                )
            where[t.name] = name
            idx.tensors[t.name] = t
    return where


def _check_index(ref: str, index: Dict[str, str], where: Dict[str, str]) -> None:
    """Every tensor the index lists is in the file it names."""
    for name, f in index.items():
        if where.get(name) != f:
            actual = f"is in {where[name]}" if name in where else "is in no weights file"
            raise MergeError(
                f"model {ref}: the index puts tensor {name} in {f}, but it {actual}; the index does not "
                "match the files (incomplete or mixed download?)"
            )


def _block_size(idx: ModelIndex) -> Tuple[int, int]:
    """config.json's quantization_config.weight_block_size ([rows, columns] of a scale's block), else 128 x 128."""
    q = (idx.config or {}).get("quantization_config")
    size = q.get("weight_block_size") if isinstance(q, dict) else None
    if size is None:
        return 128, 128
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_DIM for n in size)
    ):
        raise MergeError(
            f"model {idx.ref}: config.json's quantization_config.weight_block_size is "
            f"{json.dumps(size)[:60]}, not [rows, columns] (two whole numbers above 0); the config is "
            "corrupt"
        )
    return size[0], size[1]


def _pair_scales(idx: ModelIndex) -> None:
    """Each FP8 weight `X.weight` with a `X.weight_scale_inv` tensor reads dequantized (TensorInfo); the scale
    tensors are then no tensors of the model (neither merged nor copied)."""
    pairs = [(n[: -len(SCALE_SUFFIX)], n) for n in idx.tensors if n.endswith(SCALE_SUFFIX)]
    pairs = [(w, s) for w, s in pairs if w in idx.tensors and idx.tensors[w].stored in FP8]
    if not pairs:
        return
    block = _block_size(idx)
    for w, s in pairs:
        wi, si = idx.tensors[w], idx.tensors[s]
        want = tuple(-(-n // b) for n, b in zip(wi.shape, block))
        if len(wi.shape) != 2 or si.shape != want or not si.dtype.is_floating_point:
            raise MergeError(
                f"model {idx.ref}: {s} is {si.dtype} {list(si.shape)}, but the block scales of {w} "
                f"{list(wi.shape)} in blocks of {list(block)} are floats of shape {list(want)}; the "
                "checkpoint or its quantization_config.weight_block_size is corrupt"
            )
        idx.tensors[w] = dataclasses.replace(wi, scale=si, block=block)
        del idx.tensors[s]


def _check_layers(idx: ModelIndex) -> None:
    """A model has at least one tensor per layer: a layer count (config.json's, or a tensor name's index) above its
    tensor count is a lie that would have the planner walk that many layers."""
    from mergesmith.params import layer_index

    named = max((i for i in map(layer_index, idx.tensors) if i is not None), default=-1) + 1
    said = (idx.config or {}).get("num_hidden_layers") or 0
    if max(named, said) > len(idx.tensors):
        what = f"config.json says {said}" if said >= named else f"a tensor name says {named}"
        raise MergeError(
            f"model {idx.ref}: {what} layers, but the model holds only {len(idx.tensors)} tensors; "
            "the config or a header is corrupt"
        )


def index_model(ref: str, path: Path) -> ModelIndex:
    """Index a model folder (sharded or single safetensors, or .bin) or a single weights file. Every file is
    read as hostile: see safe_member, read_json and read_safetensors_header."""
    idx = ModelIndex(ref=ref, path=path)
    index = None
    if path.is_file():
        files, folder = [(path.name, path, path.suffix == ".safetensors")], path.parent
    else:
        folder = path
        files, index = _weight_files(ref, path)
    idx.config = read_config(folder)
    where = _add_files(idx, files)
    if index is not None:
        _check_index(ref, index, where)
    _pair_scales(idx)
    if not idx.tensors:
        raise MergeError(f"model {ref}: {path} holds no tensors")
    _check_layers(idx)
    return idx


def model_folder(idx: ModelIndex) -> Path:
    return idx.path if idx.path.is_dir() else idx.path.parent


def file_size(path: Path) -> int:
    return os.stat(path).st_size
