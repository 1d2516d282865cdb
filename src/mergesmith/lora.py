"""LoRA adapters: applied to a model while its tensors are read (`model+adapter` in a recipe), and extracted from
the difference of two models (`mergesmith extract-lora`).

PEFT's LoRA: a target linear weight W [out, in] becomes W + s * B @ A with A [r, in], B [out, r] and
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; per-module r and alpha from rank_pattern/alpha_pattern).
An embedding [vocab, hidden] becomes E + s * (B @ A)^T with lora_embedding_A [r, vocab], lora_embedding_B [hidden, r].
Tensors saved whole in the adapter (`modules_to_save`) replace the model's.
"""

from __future__ import annotations

import dataclasses
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
            At = A.t()[rows[0] : rows[1]] if rows else A.t()
            return (At @ B.t()) * s
        Bs = B[rows[0] : rows[1]] if rows else B
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
            raise MergeError(
                f"adapter {ref}: adapter_config.json: {key} key {k!r} is not a regular expression ({e})"
            ) from None
        if _backtracks(k):
            raise MergeError(
                f"adapter {ref}: adapter_config.json: {key} key {k[:60]!r} repeats a group or repeats "
                "more than twice; such a pattern can take forever to match, refused"
            )


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
    bad = next(
        (
            f"'{k}' must be {want}"
            for k, want, ok in (
                ("peft_type", "a name", lambda v: isinstance(v, str)),
                ("r", "a whole number >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                ("lora_alpha", "a number", _is_number),
                ("use_rslora", "true or false", lambda v: isinstance(v, bool)),
                ("use_dora", "true or false", lambda v: isinstance(v, bool)),
                ("fan_in_fan_out", "true or false", lambda v: isinstance(v, bool)),
            )
            if cfg.get(k) is not None and not ok(cfg[k])
        ),
        None,
    )
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
        raise MergeError(
            f"adapter {ref}: module {module}: LoRA factors A {list(A.shape)} and B {list(B.shape)} "
            "are not [r, in] and [out, r] with the same rank r >= 1"
        )
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
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
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
            raise MergeError(
                f"adapter {ref}: {name} is {list(shapes[name])} in the model but the LoRA factors give {list(want)}"
            )
    for name, t in ad.replace.items():
        if name in shapes and tuple(shapes[name]) != tuple(t.shape):
            raise MergeError(f"adapter {ref}: saved {name} is {list(t.shape)}, the model's {list(shapes[name])}")


# --------------------------------------------------------------------------------------------- extraction

# nn.Embedding weights (tokens or positions on dim 0): PEFT adapts them with lora_embedding_A/B, not lora_A/B
_EMBEDDING_RE = re.compile(
    r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|tok_embeddings|position_embeddings|"
    r"embed_positions|token_type_embeddings)\.weight$"
)


@dataclass
class ExtractOptions:
    """What `extract-lora` extracts; the names and meanings of mergekit-extract-lora's options.

    rank: the most per module (--max-rank). energy: per module, the smallest rank keeping that share of the delta's
    squared singular values. sv_epsilon: singular values <= it are dropped (an absolute threshold, as mergekit).
    embed_lora: input embeddings get a LoRA (and the head a linear one) instead of being saved whole.
    save_modules: modules saved whole (`modules_to_save`; PEFT wraps every module whose name ends with one).
    include/exclude: regular expressions searched in module names; a module is decomposed (or, if it cannot be,
    saved whole) only when it matches an include (if any) and no exclude. skip_undecomposable: norms and other
    modules LoRA cannot hold are left out rather than saved whole. distribute_scale: A and B each take sqrt(S).
    """

    rank: int = 128
    energy: Optional[float] = None
    sv_epsilon: float = 0.0
    embed_lora: bool = False
    save_modules: Tuple[str, ...] = ()
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    skip_undecomposable: bool = False
    distribute_scale: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def check(self) -> None:
        if self.rank < 1:
            raise MergeError(f"--max-rank {self.rank}: the rank must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise MergeError(f"--energy {self.energy}: give a share in (0, 1], like 0.99")
        if not math.isfinite(self.sv_epsilon) or self.sv_epsilon < 0:
            raise MergeError(f"--sv-epsilon {self.sv_epsilon}: give a singular value threshold >= 0")
        for flag, pats in (("--include-regex", self.include), ("--exclude-regex", self.exclude)):
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise MergeError(f"{flag} {p!r} is not a regular expression ({e})") from None
        bad = next((m for m in self.save_modules if not m.strip(".")), None)
        if bad is not None:
            raise MergeError(f"--save-module {bad!r}: give a module name such as lm_head or model.norm")


def low_rank(
    delta: torch.Tensor, rank: int, energy: Optional[float] = None, sv_epsilon: float = 0.0, distribute: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-r approximation of delta (truncated SVD, Eckart-Young). r = `rank`; with
    `energy` the smallest r whose singular values keep that share of sum S^2 (at most `rank`); singular values
    <= `sv_epsilon` are dropped (r may then be 0). B = U_r S_r, A = V_r^T, or with `distribute` sqrt(S_r) on each."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, S.numel())
    if energy is not None:
        e = torch.cumsum(S.double() ** 2, 0)
        total = float(e[-1])
        need = int(torch.searchsorted(e, torch.tensor(energy * total, dtype=e.dtype)).item()) + 1 if total > 0 else 1
        r = max(1, min(r, need))
    if sv_epsilon > 0:
        r = min(r, int((S > sv_epsilon).sum()))
    if distribute:
        s = S[:r].sqrt()
        return U[:, :r] * s, s[:, None] * Vh[:r]
    return U[:, :r] * S[:r], Vh[:r]


def _kind(module: str, shapes: Dict[str, Tuple[int, ...]]) -> str:
    """How PEFT sees a module, from its weight: 'embedding' (an nn.Embedding), 'head' (the output projection, a
    linear layer), 'linear' (another 2-D weight), 'other' (norms and the rest) or 'none' (no `.weight`: no
    module LoRA or modules_to_save can hold)."""
    from mergesmith.params import is_embedding

    w = f"{module}.weight"
    if not module or w not in shapes:
        return "none"
    if len(shapes[w]) != 2:
        return "other"
    if _EMBEDDING_RE.search(w):
        return "embedding"
    return "head" if is_embedding(w) else "linear"


@dataclass
class ExtractPlan:
    lora: List[str] = field(default_factory=list)  # weights to decompose (input embeddings transposed)
    save: List[str] = field(default_factory=list)  # tensors saved whole, as the fine-tune has them
    save_keys: List[str] = field(default_factory=list)  # the config's modules_to_save
    skipped: List[str] = field(default_factory=list)  # tensors the adapter does not hold


def _modules(names: List[str]) -> Dict[str, List[str]]:
    """module name -> its tensors, in order."""
    out: Dict[str, List[str]] = {}
    for n in names:
        out.setdefault(n.rpartition(".")[0], []).append(n)
    return out


def plan_extraction(names: List[str], shapes: Dict[str, Tuple[int, ...]], opts: ExtractOptions, differs) -> ExtractPlan:
    """Which tensors become LoRA factors, which are saved whole and which are left out (mergekit's rules):
    embeddings and the head are saved whole unless --embed-lora (or an --exclude-regex matches them); modules that
    pass the filters are decomposed when linear, else saved whole (or skipped with --skip-undecomposable). A module
    saved automatically is listed by its full name, and only when `differs(tensor)` for one of its tensors: an
    unchanged norm or embedding costs nothing. Every module PEFT wraps for a modules_to_save entry (names ending
    with it) is saved, so PEFT finds every key it expects."""
    mods = _modules(names)
    kinds = {m: _kind(m, shapes) for m in mods}
    keys = _saved_whole(mods, kinds, opts, differs)
    plan = ExtractPlan(save_keys=keys)
    for m, ts in mods.items():
        if kinds[m] != "none" and any(m.endswith(key) for key in keys):
            plan.save += ts
        elif (kinds[m] == "linear" or opts.embed_lora and kinds[m] in ("head", "embedding")) and _wanted(m, opts):
            plan.lora.append(f"{m}.weight")
            plan.skipped += [t for t in ts if t != f"{m}.weight"]  # a bias: PEFT's lora_bias is all or nothing
        else:
            plan.skipped += ts
    return plan


def _wanted(m: str, opts: ExtractOptions) -> bool:
    """Module m passes the --include-regex (when given) and no --exclude-regex."""
    return (not opts.include or any(re.search(p, m) for p in opts.include)) and not any(
        re.search(p, m) for p in opts.exclude
    )


def _saved_whole(mods: Dict[str, List[str]], kinds: Dict[str, str], opts: ExtractOptions, differs) -> List[str]:
    """The modules_to_save entries: the --save-module names, then every changed module saved automatically
    (embeddings and head without --embed-lora, other undecomposable modules unless --skip-undecomposable)."""
    keys = list(dict.fromkeys(opts.save_modules))
    _check_save_modules(keys, kinds)
    for m, k in kinds.items():
        if any(m.endswith(key) for key in keys) or k == "none":
            continue
        whole = k in ("embedding", "head") and not opts.embed_lora and not any(re.search(p, m) for p in opts.exclude)
        whole = whole or (k == "other" and _wanted(m, opts) and not opts.skip_undecomposable)
        if whole and any(differs(t) for t in mods[m]):
            keys.append(m)
    return keys


def _check_save_modules(keys: List[str], kinds: Dict[str, str]) -> None:
    """Each --save-module names modules with a weight (PEFT wraps those whose name ends with it), and no module
    that holds others: PEFT would copy it whole, children included, under names no adapter file has."""
    parents = {m[:i] for m in kinds for i, c in enumerate(m) if c == "."} - set(kinds)
    for key in keys:
        inner = next((p for p in sorted(parents) if p.endswith(key)), None)
        if inner is not None:
            raise MergeError(
                f"--save-module {key}: it names {inner}, which holds other modules; name the modules "
                "with weights in it instead (like lm_head, model.norm or mlp.down_proj)"
            )
        if not any(m.endswith(key) and k != "none" for m, k in kinds.items()):
            raise MergeError(f"--save-module {key}: no module of --model has a name ending with it")


def adapter_config(
    base_ref: str, modules: Dict[str, int], rank: int, modules_to_save: Optional[List[str]] = None
) -> Dict:
    """A PEFT LoraConfig as JSON: alpha = r for every module (scale 1), ranks other than `rank` in rank_pattern."""
    pattern = {m: r for m, r in modules.items() if r != rank}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "rank_pattern": {re.escape(m): r for m, r in pattern.items()},
        "alpha_pattern": {re.escape(m): r for m, r in pattern.items()},
    }


@dataclass
class Extraction:
    modules: Dict[str, int]  # module -> rank
    errors: Dict[str, float]  # module -> relative Frobenius error of the rank-r delta
    left_out: List[str]  # tensors that differ but the adapter does not hold (filtered out, skipped, LoRA biases)
    saved: List[str] = field(default_factory=list)  # tensors saved whole (modules_to_save)
    sq_err: float = 0.0  # sum over every tensor of ||adapter's delta - delta||^2
    sq_delta: float = 0.0  # sum over every tensor of ||delta||^2

    @property
    def delta_error(self) -> float:
        """||D_adapter - D||_F / ||D||_F over all tensors together (D = model - base)."""
        return math.sqrt(self.sq_err / self.sq_delta) if self.sq_delta > 0 else 0.0


def _open_model(ref: str, what: str):
    """Index a model; `model+adapter` applies a LoRA adapter while reading, as in a recipe."""
    from mergesmith.io.index import index_model
    from mergesmith.io.resolve import resolve_model

    lora = split_lora_ref(ref)
    if lora is None:
        return index_model(ref, resolve_model(ref, what, None))
    idx = index_model(ref, resolve_model(lora[0], what, None))
    idx.lora = load_adapter(resolve_model(lora[1], what, None), lora[1])
    check_targets(idx.lora, lora[1], {n: t.shape for n, t in idx.tensors.items()})
    return idx


def _same_shapes(ft, bs, model: str, base: str) -> None:
    missing = [n for n in ft.tensors if n not in bs.tensors]
    if missing:
        raise MergeError(
            f"--base {base} lacks tensor {missing[0]} of --model {model} (and {len(missing) - 1} more); "
            "are they the same architecture?"
        )
    for n, t in ft.tensors.items():
        if tuple(bs.tensors[n].shape) != tuple(t.shape):
            raise MergeError(f"tensor {n} is {list(t.shape)} in --model but {list(bs.tensors[n].shape)} in --base")


def extract_lora(
    model: str,
    base: str,
    out: Path,
    rank: int = 128,
    energy: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    overwrite: bool = False,
    options: Optional[ExtractOptions] = None,
) -> Extraction:
    """Write a PEFT LoRA adapter to `out` holding (model - base): the truncated SVD of each linear weight's delta,
    and the modules LoRA cannot hold saved whole (`options`: mergekit-extract-lora's choices; without it `rank`,
    `energy` and `dtype` with mergekit's defaults). `out` follows mergesmith.outdir's rules: apart from both models,
    locked, replaced only when ours."""
    from mergesmith import outdir
    from mergesmith.device import pick_device

    opts = options or ExtractOptions(rank=rank, energy=energy, dtype=dtype)
    opts.check()
    device = pick_device(opts.device)
    target = outdir.output_path(out)
    ft, bs = _open_model(model, "--model"), _open_model(base, "--base")
    _same_shapes(ft, bs, model, base)
    inputs = outdir.model_inputs("--model", ft) + outdir.model_inputs("--base", bs)
    with outdir.claim(target, inputs, overwrite, f"mergesmith extract-lora {out}") as partial:
        tensors, res, keys = _extract(ft, bs, opts, device, progress)
        if not res.modules:
            raise MergeError(
                f"--model {model} and --base {base}: no linear weight that the filters let through "
                "differs; there is no LoRA to extract"
            )
        outdir.fresh_partial(partial)
        cfg = adapter_config(base, res.modules, max(res.modules.values()), keys)
        save_adapter(partial, tensors, cfg)
        outdir.finish(partial, target)
    return res


class _Pair:
    """The fine-tune and the base, read tensor by tensor. A model that ties its embeddings has no lm_head.weight
    but PEFT has an lm_head module: it reads as the input embedding (as mergekit does), so that the head is saved
    (or adapted) with the embedding and base + adapter keeps them equal."""

    def __init__(self, ft, bs):
        self.ft, self.bs = ft, bs
        self.alias: Dict[str, str] = {}
        embed = next((n for n in ft.tensors if n.endswith("embed_tokens.weight")), None)
        if (ft.config or {}).get("tie_word_embeddings") is True and embed and "lm_head.weight" not in ft.tensors:
            self.alias["lm_head.weight"] = embed

    def names(self) -> List[str]:
        return [n for n, t in self.ft.tensors.items() if t.dtype.is_floating_point] + list(self.alias)

    def shape(self, n: str) -> Tuple[int, ...]:
        return tuple(self.ft.tensors[self.alias.get(n, n)].shape)

    def read(self, n: str) -> Tuple[torch.Tensor, torch.Tensor]:
        n = self.alias.get(n, n)
        return self.ft.read(n), self.bs.read(n)

    def differs(self, n: str) -> bool:
        return not torch.equal(*self.read(n))


def _extract(
    ft, bs, opts: ExtractOptions, device: torch.device, progress: bool
) -> Tuple[Dict[str, torch.Tensor], Extraction, List[str]]:
    """The adapter's tensors (PEFT names), what was extracted, and the modules_to_save entries."""
    from tqdm import tqdm

    pair = _Pair(ft, bs)
    if pair.alias and opts.embed_lora:
        # a LoRA on each tied end is right unmerged but added twice by merge_and_unload; whole tensors are right both
        warn(
            "--embed-lora: the model ties its embeddings and head; PEFT would merge their LoRAs into the shared "
            "weight twice, so both are saved whole instead"
        )
        opts = dataclasses.replace(opts, embed_lora=False)
    names = pair.names()
    plan = plan_extraction(names, {n: pair.shape(n) for n in names}, opts, pair.differs)
    tensors: Dict[str, torch.Tensor] = {}
    res = Extraction({}, {}, [])
    for n in tqdm(plan.lora, desc="extracting", disable=not progress):
        _decompose(n, pair, opts, device, tensors, res)
    for n in plan.save + plan.skipped:
        f, b = pair.read(n)
        sq = float(torch.linalg.vector_norm(f.double() - b.double())) ** 2
        res.sq_delta += sq
        if n in plan.save:
            tensors[f"{PREFIX}{n}"] = f.contiguous()
            res.saved.append(n)
        elif sq > 0:
            res.sq_err += sq
            res.left_out.append(n)
    return tensors, res, plan.save_keys


def _decompose(
    n: str, pair: _Pair, opts: ExtractOptions, device: torch.device, tensors: Dict[str, torch.Tensor], res: Extraction
) -> None:
    """One weight's LoRA factors, under PEFT's names: lora_A/B.weight, or lora_embedding_A/B for an embedding
    (its delta transposed: PEFT's embedding delta is (B @ A)^T)."""
    module = n[: -len(".weight")]
    emb = bool(_EMBEDDING_RE.search(n))
    f, b = pair.read(n)
    d = f.to(device, torch.float32) - b.to(device, torch.float32)
    d = d.t() if emb else d
    sq = float(torch.linalg.vector_norm(d.double())) ** 2
    res.sq_delta += sq
    if sq == 0:
        return
    B, A = low_rank(d, opts.rank, opts.energy, opts.sv_epsilon, opts.distribute_scale)
    err = float(torch.linalg.vector_norm((B @ A - d).double())) ** 2
    res.sq_err += err
    if A.shape[0] == 0:  # every singular value under --sv-epsilon
        return
    a, b = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
    tensors[f"{PREFIX}{module}.{a}"] = A.to("cpu", opts.dtype).contiguous()
    tensors[f"{PREFIX}{module}.{b}"] = B.to("cpu", opts.dtype).contiguous()
    res.modules[module] = A.shape[0]
    res.errors[module] = math.sqrt(err / sq)


def save_adapter(folder: Path, tensors: Dict[str, torch.Tensor], config: Dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
