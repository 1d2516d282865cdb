"""LoRA adapters: applied to a model while its tensors are read (`model+adapter` in a recipe), and extracted from
the difference of two models (`mergesmith extract-lora`).

PEFT's LoRA: a target linear weight W [out, in] becomes W + s * B @ A with A [r, in], B [out, r] and
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; per-module r and alpha from rank_pattern/alpha_pattern).
An embedding [vocab, hidden] becomes E + s * (B @ A)^T with lora_embedding_A [r, vocab], lora_embedding_B [hidden, r].
Tensors saved whole in the adapter (`modules_to_save`) replace the model's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from mergesmith.errors import MergeError, warn

PREFIX = "base_model.model."


def split_lora_ref(ref: str) -> Optional[Tuple[str, str]]:
    """`model+adapter` -> (model, adapter); None for a plain reference (or a path that contains '+')."""
    if "+" not in ref or Path(ref).exists():
        return None
    model, _, adapter = ref.rpartition("+")
    return (model, adapter) if model and adapter else None


def _pattern_value(patterns: Dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


@dataclass
class LoraAdapter:
    path: Path
    config: Dict
    # target tensor name -> (A, B, scale, embedding?)
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor, float, bool]] = field(default_factory=dict)
    replace: Dict[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """s * B @ A (or its transpose for embeddings) for rows [a, b) of tensor `name`, float32."""
        A, B, s, emb = self.factors[name]
        if emb:  # [vocab, hidden] = A^T [vocab, r] @ B^T [r, hidden]
            At = A.t()[rows[0]:rows[1]] if rows else A.t()
            return (At @ B.t()) * s
        Bs = B[rows[0]:rows[1]] if rows else B
        return (Bs @ A) * s


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_patterns(cfg: Dict, key: str, ref: str) -> None:
    """rank_pattern / alpha_pattern: {regex: number}, each key a valid regular expression."""
    pat = cfg.get(key)
    if pat is None:
        return
    if not isinstance(pat, dict):
        raise MergeError(f"adapter {ref}: adapter_config.json: '{key}' must be an object of module -> number")
    for k, v in pat.items():
        if not _is_number(v) or v < 0:
            raise MergeError(f"adapter {ref}: adapter_config.json: {key}[{k!r}] is {json.dumps(v)[:40]}, not a number")
        try:
            re.compile(k)
        except re.error as e:
            raise MergeError(f"adapter {ref}: adapter_config.json: {key} key {k!r} is not a regular expression ({e})"
                             ) from None
        if _backtracks(k):
            raise MergeError(f"adapter {ref}: adapter_config.json: {key} key {k[:60]!r} repeats a group or repeats "
                             "more than twice; such a pattern can take forever to match, refused")


def _backtracks(pattern: str) -> bool:
    """Whether a pattern may backtrack for ages on a module name (`(a+)+`, `(.*)*x`, `.*.*.*x`): a repeated
    group, or more than 2 unbounded or counted repetitions. Module names and PEFT's patterns need neither."""
    plain = re.sub(r"\\.", "", pattern)  # escaped characters repeat nothing
    return bool(re.search(r"\)[*+{]", plain)) or len(re.findall(r"[*+{]", plain)) > 2


def _adapter_config(path: Path, ref: str) -> Dict:
    """adapter_config.json, read as hostile (a regular file inside the folder, capped, an object) and with the
    types of the fields mergesmith uses checked."""
    from mergesmith.io.index import has_member, member_json

    if not has_member(path, "adapter_config.json"):
        raise MergeError(f"adapter {ref}: {path} has no adapter_config.json (is it a PEFT LoRA folder?)")
    try:
        cfg = member_json(path, "adapter_config.json")
    except MergeError as e:
        raise MergeError(f"adapter {ref}: {e}") from None
    bad = next((f"'{k}' must be {want}" for k, want, ok in (
        ("peft_type", "a name", lambda v: isinstance(v, str)),
        ("r", "a whole number >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        ("lora_alpha", "a number", _is_number),
        ("use_rslora", "true or false", lambda v: isinstance(v, bool)),
        ("use_dora", "true or false", lambda v: isinstance(v, bool)),
        ("fan_in_fan_out", "true or false", lambda v: isinstance(v, bool)),
    ) if cfg.get(k) is not None and not ok(cfg[k])), None)
    if bad:
        raise MergeError(f"adapter {ref}: adapter_config.json: {bad}")
    for key in ("rank_pattern", "alpha_pattern"):
        _check_patterns(cfg, key, ref)
    return cfg


def _adapter_tensors(path: Path, ref: str) -> Dict[str, torch.Tensor]:
    """The adapter's tensors: safetensors checked like a model's, .bin only through weights_only=True."""
    from mergesmith.io.index import has_member, load_pickled_weights, read_safetensors_header, safe_member

    try:
        if has_member(path, "adapter_model.safetensors"):
            from safetensors.torch import load_file

            st = safe_member(path, "adapter_model.safetensors")
            read_safetensors_header(st)
            return load_file(str(st))
        if has_member(path, "adapter_model.bin"):
            sd = load_pickled_weights(safe_member(path, "adapter_model.bin"))
            odd = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
            if odd is not None:
                raise MergeError(f"{path / 'adapter_model.bin'}: entry {odd!r} is not a tensor")
            return sd
    except MergeError as e:
        raise MergeError(f"adapter {ref}: {e}") from None
    raise MergeError(f"adapter {ref}: no adapter_model.safetensors or adapter_model.bin in {path}")


def _factor_pair(p: Dict[str, torch.Tensor], module: str, ref: str) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """(A, B, embedding?) of one module: two float matrices whose inner (rank) dimensions agree."""
    emb = "lora_embedding_A" in p
    A = p.get("lora_embedding_A" if emb else "lora_A")
    B = p.get("lora_embedding_B" if emb else "lora_B")
    if A is None or B is None:
        raise MergeError(f"adapter {ref}: module {module} has only one of its two LoRA factors")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
        raise MergeError(f"adapter {ref}: module {module}: LoRA factors A {list(A.shape)} and B {list(B.shape)} "
                         "are not [r, in] and [out, r] with the same rank r >= 1")
    return A, B, emb


def load_adapter(path: Path, ref: str) -> LoraAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors or .bin). Every file is read as
    hostile: a bad one is one line, and pickled code never runs."""
    cfg = _adapter_config(path, ref)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise MergeError(f"adapter {ref}: peft_type {cfg.get('peft_type')} is not supported (only LORA)")
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if cfg.get(flag):
            raise MergeError(f"adapter {ref}: {what} adapters are not supported; merge it with PEFT first")
    sd = _adapter_tensors(path, ref)
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora"))
    ad = LoraAdapter(path, cfg)
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.match(r"(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(\.weight)?$", k)
        if m and not t.is_floating_point():
            raise MergeError(f"adapter {ref}: LoRA factor {key} is {t.dtype}, not a float")
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t.float()
        elif ".modules_to_save." in k or k.endswith((".weight", ".bias")):
            ad.replace[k.replace(".modules_to_save.default", "")] = t
        else:
            raise MergeError(f"adapter {ref}: cannot place tensor {key}")
    for module, p in parts.items():
        A, B, emb = _factor_pair(p, module, ref)
        r = A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha0)
        rank = _pattern_value(cfg.get("rank_pattern"), module, r0)
        if rank != r:
            warn(f"adapter {ref}: module {module} has rank {r} but the config says {rank}; using {r}")
        s = alpha / math.sqrt(r) if rslora else alpha / r
        ad.factors[module + ".weight"] = (A, B, s, emb)
    return ad


def check_targets(ad: LoraAdapter, ref: str, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Every adapted tensor exists in the model with the shape the factors give."""
    for name, (A, B, _, emb) in ad.factors.items():
        if name not in shapes:
            raise MergeError(f"adapter {ref}: it adapts {name}, which the model does not have")
        want = (A.shape[1], B.shape[0]) if emb else (B.shape[0], A.shape[1])
        if tuple(shapes[name]) != want:
            raise MergeError(f"adapter {ref}: {name} is {list(shapes[name])} in the model but the LoRA factors "
                             f"give {list(want)}")
    for name, t in ad.replace.items():
        if name in shapes and tuple(shapes[name]) != tuple(t.shape):
            raise MergeError(f"adapter {ref}: saved {name} is {list(t.shape)}, the model's {list(shapes[name])}")


# --------------------------------------------------------------------------------------------- extraction

def low_rank(delta: torch.Tensor, rank: int, energy: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-r approximation of delta (truncated SVD, Eckart-Young): B = U_r S_r,
    A = V_r^T. r = `rank`, or with `energy` the smallest r whose singular values keep that share of sum S^2
    (at most `rank`)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, S.numel())
    if energy is not None:
        e = torch.cumsum(S.double() ** 2, 0)
        total = float(e[-1])
        need = int(torch.searchsorted(e, torch.tensor(energy * total, dtype=e.dtype)).item()) + 1 if total > 0 else 1
        r = max(1, min(r, need))
    return U[:, :r] * S[:r], Vh[:r]


def linear_targets(names: List[str], shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    """The 2-D weights LoRA can adapt: every `*.weight` matrix except embeddings and the output head."""
    from mergesmith.params import is_embedding

    return [n for n in names if n.endswith(".weight") and len(shapes[n]) == 2 and not is_embedding(n)]


def adapter_config(base_ref: str, modules: Dict[str, int], rank: int) -> Dict:
    """A PEFT LoraConfig as JSON: alpha = r for every module (scale 1), ranks per module in rank_pattern."""
    pattern = {m: r for m, r in modules.items() if r != rank}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref,
        "r": rank, "lora_alpha": rank, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "modules_to_save": None,
        "rank_pattern": {re.escape(m): r for m, r in pattern.items()},
        "alpha_pattern": {re.escape(m): r for m, r in pattern.items()},
    }


@dataclass
class Extraction:
    modules: Dict[str, int]  # module -> rank
    errors: Dict[str, float]  # module -> relative Frobenius error of the rank-r delta
    left_out: List[str]  # tensors that differ but LoRA cannot hold (norms, embeddings, head)


def extract_lora(model: str, base: str, out: Path, rank: int, energy: Optional[float] = None,
                 dtype: torch.dtype = torch.float32, progress: bool = True, overwrite: bool = False) -> Extraction:
    """Write a PEFT LoRA adapter to `out` whose delta is the rank-`rank` SVD of (model - base), per linear weight.
    `out` follows mergesmith.outdir's rules: apart from both models, locked, replaced only when ours."""
    from mergesmith import outdir
    from mergesmith.io.index import index_model
    from mergesmith.io.resolve import resolve_model

    if rank < 1:
        raise MergeError(f"--rank {rank}: the rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise MergeError(f"--energy {energy}: give a share in (0, 1], like 0.99")
    target = outdir.output_path(out)
    ft = index_model(model, resolve_model(model, "--model", None))
    bs = index_model(base, resolve_model(base, "--base", None))
    shapes = {n: t.shape for n, t in ft.tensors.items()}
    missing = [n for n in ft.tensors if n not in bs.tensors]
    if missing:
        raise MergeError(f"--base {base} lacks tensor {missing[0]} of --model {model} (and {len(missing) - 1} more); "
                         "are they the same architecture?")
    for n, s in shapes.items():
        if tuple(bs.tensors[n].shape) != tuple(s):
            raise MergeError(f"tensor {n} is {list(s)} in --model but {list(bs.tensors[n].shape)} in --base")
    inputs = outdir.model_inputs("--model", ft) + outdir.model_inputs("--base", bs)
    with outdir.claim(target, inputs, overwrite, f"mergesmith extract-lora {out}") as partial:
        tensors, res = _factors(ft, bs, rank, energy, dtype, progress)
        if not res.modules:
            raise MergeError(f"--model {model} and --base {base} have the same linear weights: there is nothing "
                             "to extract")
        outdir.fresh_partial(partial)
        save_adapter(partial, tensors, adapter_config(base, res.modules, rank))
        outdir.finish(partial, target)
    return res


def _factors(ft, bs, rank: int, energy: Optional[float], dtype: torch.dtype, progress: bool
             ) -> Tuple[Dict[str, torch.Tensor], Extraction]:
    """The adapter's tensors (PEFT names) for every linear weight that differs, and what was extracted."""
    from tqdm import tqdm

    shapes = {n: t.shape for n, t in ft.tensors.items()}
    targets = linear_targets(list(ft.tensors), shapes)
    tensors: Dict[str, torch.Tensor] = {}
    res = Extraction({}, {}, [])
    for n in tqdm(targets, desc="extracting", disable=not progress):
        d = ft.read(n).float() - bs.read(n).float()
        norm = float(torch.linalg.vector_norm(d))
        if norm == 0:
            continue
        B, A = low_rank(d, rank, energy)
        module = n[: -len(".weight")]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.to(dtype).contiguous()
        res.modules[module] = A.shape[0]
        res.errors[module] = float(torch.linalg.vector_norm(B @ A - d)) / norm
    for n in ft.tensors:
        if n in targets or not ft.tensors[n].dtype.is_floating_point:
            continue
        if not torch.equal(ft.read(n), bs.read(n)):
            res.left_out.append(n)
    return tensors, res


def save_adapter(folder: Path, tensors: Dict[str, torch.Tensor], config: Dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
