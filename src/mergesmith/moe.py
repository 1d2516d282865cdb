"""Mixtures of experts from dense fine-tunes of one base (mergekit-moe's recipes; docs/moe.md).

The output takes the base's attention, embeddings and norms, each expert's MLP as one expert of every layer, and
a router per layer computed from prompts (mergesmith.routers). The recipe is mergekit-moe's schema, read with line
numbers and validated before any work like a merge recipe (mergesmith.recipe); the tensors are streamed one at a
time into the planned shards (mergesmith.io.writer), in an OUT_DIR.partial/ with a resume journal, under the
output folder's rules (mergesmith.outdir).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesmith import __version__
from mergesmith.errors import MergeError, did_you_mean, log, warn, where
from mergesmith.recipe import DTYPES, MAX_RECIPE_BYTES, TokenizerConfig, _load_yaml, _schema_error, short

# --------------------------------------------------------------------------------------------------------------
# Schema (mergekit-moe 0.1.5's field names; `eval_prompts` and `calibrate` are mergesmith's, which mergekit ignores)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatPrompt(_Model):
    """A chat exchange: the router should send the tokens that produce `answer` to the expert (routers.encode)."""

    prompt: str
    answer: str


Prompt = Union[str, ChatPrompt]


class Expert(_Model):
    source_model: str
    positive_prompts: Optional[List[Prompt]] = None
    negative_prompts: Optional[List[Prompt]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None
    eval_prompts: Optional[List[Prompt]] = None


class MoEConfig(_Model):
    base_model: str
    experts: List[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[List[Expert]] = None
    architecture: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None
    calibrate: bool = False


Path_ = Tuple[Union[str, int], ...]
_EXPERT_KEYS = tuple(Expert.model_fields)
_KNOWN: Dict[Path_, Tuple[str, ...]] = {
    (): tuple(MoEConfig.model_fields),
    ("experts", "*"): _EXPERT_KEYS,
    ("shared_experts", "*"): _EXPERT_KEYS,
    **{
        (g, "*", k, "*"): tuple(ChatPrompt.model_fields)
        for g in ("experts", "shared_experts")
        for k in ("positive_prompts", "negative_prompts", "eval_prompts")
    },
    ("tokenizer",): tuple(TokenizerConfig.model_fields),
}
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
PROMPT_KEYS = ("positive_prompts", "negative_prompts", "eval_prompts")


@dataclass
class MoERecipe:
    config: MoEConfig
    source: str = "<recipe>"
    text: str = ""
    lines: Dict[Path_, int] = field(default_factory=dict)

    def at(self, *path: Union[str, int]) -> str:
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        return where(self.source, self.lines.get(p))

    def found_at(self) -> Dict[str, str]:
        from mergesmith.recipe import FOUND_AT

        return {m.group(1): m.group(2) for m in map(FOUND_AT.match, self.text.splitlines()) if m}


# --------------------------------------------------------------------------------------------------------------
# Reading the recipe


def read_text(path: Union[str, Path]) -> str:
    """A recipe file's text, refused (one line) when it is missing, too large, not a regular file or not UTF-8."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir() and not p.is_file():
            raise MergeError(f"recipe {p} is not a regular file; save the recipe to a file")
        if p.is_file() and p.stat().st_size > MAX_RECIPE_BYTES:
            raise MergeError(f"{p}: the recipe is {p.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"recipe not found: {p}") from None
    except IsADirectoryError:
        raise MergeError(f"recipe is a folder, not a YAML file: {p}") from None
    except UnicodeDecodeError as e:
        raise MergeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MergeError(f"cannot read recipe {p}: {e.strerror}") from None


def is_moe_recipe(path: Union[str, Path]) -> bool:
    """The recipe is a mixture of experts (an `experts:` list and no `merge_method:`); False for anything that
    cannot be read, which the merge recipe reader then reports."""
    try:
        data, _, _ = _load_yaml(read_text(path), Path(path).name)
    except MergeError:
        return False
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def _pattern(path: Path_) -> Path_:
    return tuple("*" if isinstance(p, int) else p for p in path)


def _scrub(obj: Any, path: Path_, loc, notes: List[str], strict: bool) -> Any:
    """Unknown keys left out with a warning naming their line (mergekit ignores them), refused under strict."""
    if isinstance(obj, list):
        return [_scrub(v, path + (i,), loc, notes, strict) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    known = _KNOWN.get(_pattern(path))
    out = {}
    for k, v in obj.items():
        if known is not None and k not in known:
            msg = f"{loc(path + (k,))}: unknown key {short(k)}{did_you_mean(k, known)}; mergekit ignores it"
            if strict:
                raise MergeError(msg + " (refused under --strict)")
            notes.append(msg + ", and so do we")
            continue
        out[k] = _scrub(v, path + (k,), loc, notes, strict)
    return out


def _prompt_problem(p: Any) -> Optional[str]:
    """What is wrong with one prompt (None: nothing): text, or {prompt: text, answer: text}."""
    if isinstance(p, str):
        return None
    if isinstance(p, dict):
        bad = [k for k in ChatPrompt.model_fields if not isinstance(p.get(k), str)]
        return f"a mapping whose {' and '.join(bad)} is not text" if bad else None
    return f"{short(p)}, not text"


def _check_prompt_lists(data: Dict[str, Any], loc) -> None:
    """Prompts are lists of text (or chat exchanges): say which item is not, before the schema's generic
    message."""
    for group in ("experts", "shared_experts"):
        items = data.get(group)
        for e, ex in enumerate(items if isinstance(items, list) else []):
            for key in PROMPT_KEYS:
                v = ex.get(key) if isinstance(ex, dict) else None
                if v is None:
                    continue
                if not isinstance(v, list):
                    raise MergeError(
                        f"{loc((group, e, key))}: {group}[{e}].{key} must be a list of prompts "
                        f"(one '- text' per line), not {short(v)}"
                    )
                for j, p in enumerate(v):
                    problem = _prompt_problem(p)
                    if problem:
                        raise MergeError(
                            f"{loc((group, e, key, j))}: prompt {j + 1} of {group}[{e}].{key} is "
                            f"{problem}; write each prompt as a quoted string (or as "
                            "{prompt: ..., answer: ...})"
                        )


def _check_numbers(data: Dict[str, Any], loc) -> None:
    """true/false is no number (the schema would read it as 1 or 0)."""
    found = [(("experts_per_token",), data.get("experts_per_token"))]
    for group in ("experts", "shared_experts"):
        items = data.get(group)
        found += [
            ((group, e, k), ex.get(k))
            for e, ex in enumerate(items if isinstance(items, list) else [])
            if isinstance(ex, dict)
            for k in ("noise_scale", "residual_scale")
        ]
    for path, v in found:
        if isinstance(v, bool):
            raise MergeError(f"{loc(path)}: {'.'.join(map(str, path))} is {str(v).lower()}, not a number")


def parse_moe(text: str, source: str = "<recipe>", strict: bool = False) -> MoERecipe:
    """Parse and validate a mixture-of-experts recipe's text. Raises MergeError naming the line of a problem."""
    data, lines, notes = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise MergeError(f"{where(source, 1)}: a recipe is a YAML mapping (keys like base_model:, experts:)")

    def loc(path: Path_) -> str:
        p = tuple(path)
        while p and p not in lines:
            p = p[:-1]
        return where(source, lines.get(p))

    clean = _scrub(data, (), loc, notes, strict)
    if not clean.get("experts"):
        raise MergeError(
            f"{loc(('experts',))}: the recipe has no experts; list them under 'experts:' (each with "
            "source_model: and positive_prompts:)"
        )
    _check_prompt_lists(clean, loc)
    _check_numbers(clean, loc)
    try:
        config = MoEConfig.model_validate(clean)
    except ValidationError as e:
        raise MergeError(_schema_error(e, clean, loc)) from None
    r = MoERecipe(config=config, source=source, text=text, lines=lines)
    _check_recipe(r)
    for n in notes:
        warn(n)
    return r


def load_moe(path: Union[str, Path], strict: bool = False) -> MoERecipe:
    return parse_moe(read_text(path), Path(path).name, strict)


_BAD_IN_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _all_experts(c: MoEConfig) -> List[Tuple[str, int, Expert]]:
    return [("experts", i, e) for i, e in enumerate(c.experts)] + [
        ("shared_experts", i, e) for i, e in enumerate(c.shared_experts or [])
    ]


def _check_recipe(r: MoERecipe) -> None:
    """What can be told from the recipe alone."""
    c = r.config
    if c.gate_mode not in GATE_MODES:
        raise MergeError(
            f"{r.at('gate_mode')}: unknown gate_mode {short(c.gate_mode)}"
            f"{did_you_mean(c.gate_mode, GATE_MODES)}; use one of {', '.join(GATE_MODES)}"
        )
    if c.dtype is not None and c.dtype not in DTYPES:
        raise MergeError(
            f"{r.at('dtype')}: dtype {short(c.dtype)} is not a dtype{did_you_mean(c.dtype, DTYPES)}; "
            "use bfloat16, float16 or float32"
        )
    if not 1 <= c.experts_per_token <= len(c.experts):
        raise MergeError(
            f"{r.at('experts_per_token')}: experts_per_token {c.experts_per_token} must lie in [1, "
            f"{len(c.experts)}] (the number of experts)"
        )
    _check_tokenizer(r)
    _check_models(r)


def _check_models(r: MoERecipe) -> None:
    """Model references are names, and the experts' scales are finite (noise_scale >= 0)."""
    c = r.config
    refs = [(c.base_model, ("base_model",))] + [(e.source_model, (g, i, "source_model")) for g, i, e in _all_experts(c)]
    refs += [(c.tokenizer_source, ("tokenizer_source",))] if c.tokenizer_source else []
    for ref, path in refs:
        if not ref.strip() or _BAD_IN_NAME.search(ref):
            raise MergeError(
                f"{r.at(*path)}: the model reference {short(ref)} is empty or holds a control "
                "character; give a folder path or a Hub id"
            )
    for g, i, e in _all_experts(c):
        for key in ("noise_scale", "residual_scale"):
            v = getattr(e, key)
            if v is not None and (not math.isfinite(v) or (key == "noise_scale" and v < 0)):
                raise MergeError(
                    f"{r.at(g, i, key)}: {key} {v} must be a finite number" + (" >= 0" if key == "noise_scale" else "")
                )


def _check_tokenizer(r: MoERecipe) -> None:
    """An MoE keeps the base's vocabulary: no tokenizer the recipe would build."""
    c = r.config
    if c.tokenizer is not None and (c.tokenizer.source != "base" or c.tokenizer.tokens):
        raise MergeError(
            f"{r.at('tokenizer')}: an MoE keeps the base's vocabulary; 'tokenizer:' may only say "
            "source: base (or use tokenizer_source: MODEL to copy another model's tokenizer files)"
        )
    if c.tokenizer_source == "union":
        raise MergeError(
            f"{r.at('tokenizer_source')}: an MoE keeps the base's vocabulary, so it cannot build a "
            "union tokenizer; use tokenizer_source: base or a model with the base's vocabulary"
        )


def check_prompts(r: MoERecipe, calibrate: bool, allow_all_same: bool) -> None:
    """mergekit-moe's checks of the experts: prompts where the gate needs them, not all alike, not all one model."""
    c = r.config
    if c.gate_mode in PROMPT_MODES or calibrate:
        why = "--calibrate fits the routers on them" if calibrate else f"gate_mode {c.gate_mode} needs them"
        for i, e in enumerate(c.experts):
            if not e.positive_prompts:
                raise MergeError(
                    f"{r.at('experts', i)}: expert {i + 1} ({e.source_model}) has no positive_prompts; "
                    f"{why} (or use gate_mode: random)"
                )
        if len(c.experts) > 1:
            first = (c.experts[0].positive_prompts, c.experts[0].negative_prompts or [])
            if all((e.positive_prompts, e.negative_prompts or []) == first for e in c.experts[1:]):
                raise MergeError(
                    f"{r.at('experts')}: every expert has the same prompts, so the router cannot tell "
                    "them apart; give each expert prompts of what it should receive"
                )
    if not allow_all_same and all(e.source_model == c.experts[0].source_model for e in c.experts):
        raise MergeError(
            f"{r.at('experts')}: every expert is {c.experts[0].source_model}, so the MoE computes "
            "what that model does at a multiple of the cost; list different models, or pass "
            "--i-understand-this-is-not-useful-without-training to build it for training"
        )


# --------------------------------------------------------------------------------------------------------------
# Output families


@dataclass(frozen=True)
class Family:
    name: str  # mergekit's name, matched by the recipe's `architecture:` prefix
    model_type: str
    arch: str
    inputs: Tuple[str, ...]  # model types of the inputs it is built from
    shared: bool  # one shared expert (required) or none
    aliases: Tuple[str, ...] = ()

    def moe_prefix(self, i: int) -> str:
        return f"model.layers.{i}.block_sparse_moe" if self.model_type == "mixtral" else f"model.layers.{i}.mlp"

    def expert_name(self, i: int, e: int, proj: str) -> str:
        """The output tensor of expert e's projection `proj` (gate, up, down) in layer i, as transformers saves."""
        if self.model_type == "mixtral":
            return f"{self.moe_prefix(i)}.experts.{e}.{dict(gate='w1', down='w2', up='w3')[proj]}.weight"
        return f"{self.moe_prefix(i)}.experts.{e}.{proj}_proj.weight"

    def gate_name(self, i: int) -> str:
        return f"{self.moe_prefix(i)}.gate.weight"


MIXTRAL = Family("Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), False)
QWEN2 = Family(
    "Qwen MoE",
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    ("llama", "mistral", "qwen2"),
    True,
    ("qwen2_moe", "qwen2moe", "qwen2"),
)
QWEN3 = Family("Qwen3 MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), False, ("qwen3_moe", "qwen3moe"))
FAMILIES = (MIXTRAL, QWEN2, QWEN3)  # mergekit's order of preference (its DeepSeek MoE came second)


def _unfit(f: Family, c: MoEConfig, model_type: str) -> Optional[str]:
    """Why family f cannot hold this recipe's MoE (None: it can)."""
    n_shared = len(c.shared_experts or [])
    if model_type not in f.inputs:
        return f"{f.name} is built from {'/'.join(f.inputs)} models, these are {model_type}"
    if f.shared and n_shared != 1:
        return f"{f.name} needs exactly one shared expert ({n_shared} given)"
    if not f.shared and n_shared:
        return f"{f.name} has no shared experts"
    if f.shared and c.gate_mode in PROMPT_MODES and not c.shared_experts[0].positive_prompts:
        return f"{f.name}'s shared expert gate needs positive_prompts for the shared expert"
    return None


def pick_family(r: MoERecipe, model_type: str) -> Family:
    """mergekit's choice: the families whose name starts with `architecture:` (all when none is given) that can
    hold the recipe; Mixtral when it can, else the first."""
    c = r.config
    want = (c.architecture or "").lower()
    if want.startswith("deepseek"):
        raise MergeError(
            f"{r.at('architecture')}: the DeepSeek MoE output needs the deepseek-moe model code, which "
            "transformers does not ship and mergesmith never runs; use architecture: mixtral or qwen"
        )
    pool = [f for f in FAMILIES if f.name.lower().startswith(want) or want in f.aliases]
    if not pool:
        names = ", ".join(f.name for f in FAMILIES)
        raise MergeError(
            f"{r.at('architecture')}: unknown architecture {short(c.architecture)}"
            f"{did_you_mean(want, [f.name.lower() for f in FAMILIES])}; use one of {names}"
        )
    reasons = [(f, _unfit(f, c, model_type)) for f in pool]
    fit = [f for f, why in reasons if why is None]
    if not fit:
        raise MergeError(
            f"{r.at('architecture' if c.architecture else 'base_model')}: no MoE output fits: "
            + "; ".join(why for _, why in reasons)
        )
    return fit[0]


# --------------------------------------------------------------------------------------------------------------
# The plan: every output tensor and where it comes from


@dataclass(frozen=True)
class Source:
    kind: str  # "copy" (a model's tensor), "router", "shared_router", "zeros"
    model: str = ""
    name: str = ""
    layer: int = -1
    expert: Optional[Expert] = None  # noise_scale / residual_scale to apply
    residual: bool = False  # a down projection (residual_scale applies)


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    source: Source


@dataclass
class MoEPlan:
    recipe: MoERecipe
    family: Family
    models: "OrderedDict[str, Any]"  # ref -> ModelIndex
    tensors: List[OutTensor]
    layout: Any
    out_dtype: torch.dtype
    num_layers: int
    hidden: int
    config: Dict[str, Any]  # the output's config.json
    seed: int
    calibrate: bool
    gated_shared: bool  # the shared expert has a gate (Qwen MoE)
    template: Optional[str] = None  # the chat template for the output's tokenizer
    tokenizer: Any = None  # the base's, for the prompts (None when nothing needs it)
    notes: List[str] = field(default_factory=list)

    @property
    def base(self):
        return self.models[self.recipe.config.base_model]

    def expert_models(self, shared: bool = False) -> list:
        c = self.recipe.config
        return [self.models[e.source_model] for e in ((c.shared_experts or []) if shared else c.experts)]

    @property
    def bytes_written(self) -> int:
        return self.layout.total_bytes


TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MLP_PROJ = ("gate", "up", "down")


def _resolve(r: MoERecipe, recipe_dir: Optional[Path]) -> "OrderedDict[str, Any]":
    from mergesmith.io.index import model_folder, refuse_custom_code
    from mergesmith.plan import load_model, model_layers

    c = r.config
    refs = [(c.base_model, ("base_model",))] + [(e.source_model, (g, i, "source_model")) for g, i, e in _all_experts(c)]
    if c.tokenizer_source and c.tokenizer_source != "base":
        refs.append((c.tokenizer_source, ("tokenizer_source",)))
    found = r.found_at()
    models: "OrderedDict[str, Any]" = OrderedDict()
    for ref, path in refs:
        if ref not in models:
            idx = load_model(ref, r.at(*path), recipe_dir, found.get(ref))
            if idx.lora is not None:
                raise MergeError(
                    f"{r.at(*path)}: {ref}: an MoE takes whole models, not model+adapter; merge the "
                    "adapter into its model first"
                )
            model_layers(idx, r.at(*path))
            models[ref] = idx
    refuse_custom_code(model_folder(models[c.base_model]), "moe")  # the base's tokenizer and config are loaded
    return models


def _model_type(r: MoERecipe, models) -> str:
    """The one model type of the base and experts (mergekit requires the same architecture for all)."""
    c = r.config
    types = []
    for ref, path in [(c.base_model, ("base_model",))] + [
        (e.source_model, (g, i, "source_model")) for g, i, e in _all_experts(c)
    ]:
        mt = (models[ref].config or {}).get("model_type")
        if not isinstance(mt, str):
            raise MergeError(
                f"{r.at(*path)}: model {ref} has no config.json with a model_type; an MoE needs to "
                "know the architecture"
            )
        types.append((mt, path, ref))
    first = types[0][0]
    for mt, path, ref in types[1:]:
        if mt != first:
            raise MergeError(
                f"{r.at(*path)}: model {ref} is a {mt} model but the base is {first}; every expert "
                "must share the base's architecture"
            )
    return first


def _shape(idx, name: str) -> Optional[Tuple[int, ...]]:
    t = idx.tensors.get(name)
    return tuple(t.shape) if t is not None else None


_MLP_WEIGHT = re.compile(r"\.mlp\.(gate|up|down)_proj\.weight$")


def _check_mlps(r: MoERecipe, models, layers: int, hidden: int) -> Dict[str, int]:
    """Every expert has the base's layer count and, per layer, gate/up/down MLP weights [I, H], [I, H], [H, I]:
    a routed expert with the base's I (it is a fine-tune of the base), the shared expert with an I of its own.
    Returns {"experts": I, "shared": I of the shared expert}."""
    from mergesmith.plan import model_layers

    sizes: Dict[str, int] = {}
    base = models[r.config.base_model]
    base_inter = (_shape(base, "model.layers.0.mlp.gate_proj.weight") or (-1,))[0]
    for g, i, e in _all_experts(r.config):
        idx, at = models[e.source_model], r.at(g, i, "source_model")
        if model_layers(idx) != layers:
            raise MergeError(
                f"{at}: expert {e.source_model} has {model_layers(idx)} layers, the base {layers}; "
                "experts must be fine-tunes of the base"
            )
        extra = next((n for n in idx.tensors if ".mlp." in n and not _MLP_WEIGHT.search(n)), None)
        if extra:
            raise MergeError(
                f"{at}: expert {e.source_model} has tensor {extra}; an expert's MLP is gate, up and "
                "down projections without biases"
            )
        inter = (_shape(idx, "model.layers.0.mlp.gate_proj.weight") or (-1,))[0]
        if g == "experts" and base_inter > 0:
            inter = base_inter  # a routed expert is a fine-tune of the base: the base's MLP shape
        for k in range(layers):
            for proj in MLP_PROJ:
                name = f"model.layers.{k}.mlp.{proj}_proj.weight"
                want = (hidden, inter) if proj == "down" else (inter, hidden)
                got = _shape(idx, name)
                if got != want or not idx.tensors[name].dtype.is_floating_point:
                    raise MergeError(
                        f"{at}: expert {e.source_model}'s {name} is "
                        f"{list(got) if got else 'missing'}, not {list(want)}; an expert must be a "
                        "float model of the base's shape (a fine-tune of it)"
                    )
        group = "shared" if g == "shared_experts" else "experts"
        if sizes.setdefault(group, inter) != inter:
            raise MergeError(
                f"{at}: expert {e.source_model}'s MLP has {inter} intermediate units, the first "
                f"expert's {sizes[group]}; every routed expert needs the same MLP shape"
            )
    return sizes


def _base_dims(r: MoERecipe, base) -> Tuple[int, int]:
    """(layers, hidden size) of the base, which must hold the embedding an MoE's router computation reads."""
    from mergesmith.plan import model_layers

    emb = _shape(base, "model.embed_tokens.weight")
    if not emb or len(emb) != 2:
        raise MergeError(
            f"{r.at('base_model')}: model {base.ref} has no model.embed_tokens.weight; an MoE is built "
            "from Llama, Mistral or Qwen models with the usual tensor names"
        )
    return model_layers(base), emb[1]


def _out_dtype(r: MoERecipe, base) -> torch.dtype:
    """The recipe's dtype, else the base config's, else its embedding's (mergekit: dtype, else the base's)."""
    name = r.config.dtype or (base.config or {}).get("torch_dtype") or (base.config or {}).get("dtype")
    if isinstance(name, str) and name in DTYPES:
        return TORCH_DTYPES[DTYPES[name]]
    return base.tensors["model.embed_tokens.weight"].dtype


def _base_tensors(r: MoERecipe, fam: Family, base, out_dtype) -> List[OutTensor]:
    """The base's tensors but its MLPs; a bias the output family cannot hold is refused; Qwen MoE from a
    model without q/k/v biases gets zero ones (its attention always has them)."""
    out = []
    for name, t in base.tensors.items():
        if ".mlp." in name:
            continue
        if (
            name.endswith(".bias")
            and not (fam is QWEN2 and re.search(r"\.(q|k|v)_proj\.bias$", name))
            and not (fam is QWEN3 and ".self_attn." in name)
        ):
            raise MergeError(
                f"{r.at('base_model')}: the base has tensor {name}, which a {fam.name} model has no "
                "place for; choose another architecture:"
            )
        dtype = out_dtype if t.dtype.is_floating_point else t.dtype
        out.append(OutTensor(name, dtype, tuple(t.shape), Source("copy", base.ref, name)))
        m = re.match(r"(.*\.self_attn\.(q|k|v)_proj)\.weight$", name)
        if fam is QWEN2 and m and m.group(1) + ".bias" not in base.tensors:
            out.append(OutTensor(m.group(1) + ".bias", out_dtype, (t.shape[0],), Source("zeros")))
    return out


def _expert_tensors(r: MoERecipe, fam: Family, layers: int, hidden: int, out_dtype) -> List[OutTensor]:
    """Per layer: each expert's MLP, the router, and the shared expert with its gate."""
    c, out = r.config, []
    for i in range(layers):
        for e, ex in enumerate(c.experts):
            for proj in MLP_PROJ:
                src = f"model.layers.{i}.mlp.{proj}_proj.weight"
                out.append(
                    OutTensor(
                        fam.expert_name(i, e, proj),
                        out_dtype,
                        (),
                        Source("copy", ex.source_model, src, expert=ex, residual=proj == "down"),
                    )
                )
        out.append(OutTensor(fam.gate_name(i), out_dtype, (len(c.experts), hidden), Source("router", layer=i)))
        if fam.shared:
            ex = c.shared_experts[0]
            for proj in MLP_PROJ:
                src = f"model.layers.{i}.mlp.{proj}_proj.weight"
                out.append(
                    OutTensor(
                        f"model.layers.{i}.mlp.shared_expert.{proj}_proj.weight",
                        out_dtype,
                        (),
                        Source("copy", ex.source_model, src, expert=ex, residual=proj == "down"),
                    )
                )
            out.append(
                OutTensor(
                    f"model.layers.{i}.mlp.shared_expert_gate.weight",
                    out_dtype,
                    (1, hidden),
                    Source("shared_router", layer=i),
                )
            )
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _with_shapes(models, tensors: List[OutTensor]) -> List[OutTensor]:
    """Copied tensors take their source's shape."""
    return [
        OutTensor(t.name, t.dtype, tuple(models[t.source.model].tensors[t.source.name].shape), t.source)
        if t.source.kind == "copy"
        else t
        for t in tensors
    ]


def output_config(
    r: MoERecipe, fam: Family, base_cfg: Dict[str, Any], sizes: Dict[str, int], out_dtype: torch.dtype
) -> Dict[str, Any]:
    """The output's config.json: the base's, turned into the family's MoE config (as mergekit-moe does), checked
    by transformers' config class."""
    c = r.config
    cfg = {k: v for k, v in base_cfg.items() if k not in ("auto_map", "architectures", "model_type")}
    cfg.update(model_type=fam.model_type, architectures=[fam.arch], num_experts_per_tok=c.experts_per_token)
    if fam is MIXTRAL:
        cfg.update(num_local_experts=len(c.experts), intermediate_size=sizes["experts"])
    else:
        cfg.update(
            num_experts=len(c.experts),
            moe_intermediate_size=sizes["experts"],
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    if fam is QWEN2:
        cfg.update(shared_expert_intermediate_size=sizes["shared"], qkv_bias=True)
        if base_cfg.get("model_type") != "qwen2":  # mergekit: Qwen MoE from Llama/Mistral attends to all tokens
            cfg.update(use_sliding_window=False, sliding_window=None)
            cfg.pop("layer_types", None)
    dname = str(out_dtype).replace("torch.", "")
    for k in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["dtype"]:
        cfg[k] = dname
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        CONFIG_MAPPING[fam.model_type].from_dict({k: v for k, v in cfg.items() if k != "model_type"})
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise MergeError(
            f"{r.at('base_model')}: the base's config.json does not make a valid {fam.name} config "
            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        ) from None
    return cfg


def make_moe_plan(
    r: MoERecipe,
    recipe_dir: Optional[Path],
    *,
    seed: Optional[int] = None,
    calibrate: bool = False,
    allow_all_same: bool = False,
    shard_size: int = 5 * 10**9,
) -> MoEPlan:
    """Check the recipe against its models and plan every output tensor; the first problem is the one raised."""
    from mergesmith.io.writer import plan_layout

    calibrate = calibrate or r.config.calibrate
    check_prompts(r, calibrate, allow_all_same)
    models = _resolve(r, recipe_dir)
    c = r.config
    fam = pick_family(r, _model_type(r, models))
    base = models[c.base_model]
    layers, hidden = _base_dims(r, base)
    sizes = _check_mlps(r, models, layers, hidden)
    out_dtype = _out_dtype(r, base)
    tensors = _base_tensors(r, fam, base, out_dtype) + _expert_tensors(r, fam, layers, hidden, out_dtype)
    tensors = sorted(_with_shapes(models, tensors), key=lambda t: _natural(t.name))
    config = output_config(r, fam, base.config or {}, sizes, out_dtype)
    layout = plan_layout([(t.name, t.dtype, t.shape) for t in tensors], shard_size)
    notes = []
    if (len(c.experts) & (len(c.experts) - 1)) != 0:
        notes.append(f"{len(c.experts)} experts is not a power of two; llama.cpp cannot run such a model")
    return MoEPlan(
        recipe=r,
        family=fam,
        models=models,
        tensors=tensors,
        layout=layout,
        out_dtype=out_dtype,
        num_layers=layers,
        hidden=hidden,
        config=config,
        seed=secrets.randbits(31) if seed is None else seed,
        calibrate=calibrate,
        gated_shared=fam.shared,
        notes=notes,
    )


def plan_text(recipe: str, strict: bool = False, calibrate: bool = False, allow_all_same: bool = False) -> str:
    """What `mergesmith moe RECIPE` would build, after every check that comes before work (for `mergesmith plan`)."""
    r = load_moe(recipe, strict)
    p = make_moe_plan(r, Path(recipe).resolve().parent, calibrate=calibrate, allow_all_same=allow_all_same)
    _prepare(p, recipe, tokenizer=True, report=False)
    return describe(p)


def describe(p: MoEPlan) -> str:
    c = p.recipe.config
    gate = "calibrated (logistic regression on the positive prompts)" if p.calibrate else c.gate_mode
    lines = [
        f"{p.family.name} ({p.family.arch}) of {len(c.experts)} experts, {c.experts_per_token} per token, "
        f"{p.num_layers} layers, {str(p.out_dtype).replace('torch.', '')}; routers: {gate}",
        f"attention, embeddings and norms from {c.base_model}",
    ]
    lines += [f"expert {i}: {e.source_model}" for i, e in enumerate(c.experts)]
    lines += [f"shared expert: {e.source_model}" for e in c.shared_experts or []]
    lines.append(f"{len(p.tensors)} tensors, {p.bytes_written / 1e6:.1f} MB in {len(p.layout.files)} file(s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Routers


def load_tokenizer(p: MoEPlan):
    """The base's tokenizer (mergekit tokenizes the router prompts with it), loaded with transformers' own
    classes after its files were checked; every prompt is tokenized once here, so that a prompt too long or
    empty is refused before any work."""
    from mergesmith.io.index import model_folder
    from mergesmith.routers import encode
    from mergesmith.vocab import _load_tokenizer

    tok = _load_tokenizer(model_folder(p.base), p.recipe.config.base_model)
    for g, i, e in _all_experts(p.recipe.config):
        for key in PROMPT_KEYS:
            for j, item in enumerate(getattr(e, key) or []):
                n = len(encode(tok, item, f"{p.recipe.at(g, i, key, j)}: prompt {j + 1} of {g}[{i}].{key}")[0])
                if n > MAX_PROMPT_TOKENS:
                    raise MergeError(
                        f"{p.recipe.at(g, i, key, j)}: prompt {j + 1} of {g}[{i}].{key} is {n} tokens; "
                        f"router prompts are short texts (at most {MAX_PROMPT_TOKENS} tokens): split it"
                    )
    return tok


MAX_PROMPT_TOKENS = 2048  # attention over a prompt holds tokens^2 scores per head: bounded here


def _moe_layers(p: MoEPlan, shared_gates: Optional[torch.Tensor]):
    from mergesmith.routers import MoELayers

    shared = p.expert_models(shared=True)
    return MoELayers(
        p.expert_models(), p.recipe.config.experts_per_token, p.out_dtype, shared[0] if shared else None, shared_gates
    )


def _mergekit_gates(p: MoEPlan, stack, tok, experts: List[Expert]) -> torch.Tensor:
    """(layers, len(experts), hidden) by the recipe's gate_mode."""
    from mergesmith import routers

    mode = p.recipe.config.gate_mode
    if mode in ("random", "uniform_random"):
        return routers.random_gates(p.num_layers, len(experts), p.hidden, p.seed, uniform=mode == "uniform_random")
    sets = routers.PromptSets.of(tok, experts)
    if mode == "cheap_embed":
        return routers.cheap_embed_gates(p.base.read("model.embed_tokens.weight"), sets, p.num_layers)
    return routers.hidden_gates(stack, sets, average=mode == "hidden_avg")


def _labelled(tok, groups: List[List[Prompt]]) -> Tuple[List[List[int]], List[int], List[List[int]]]:
    """(token ids, expert label, counted positions) of each prompt of each expert's list."""
    from mergesmith.routers import encode

    seqs, labels, positions = [], [], []
    for e, items in enumerate(groups):
        for item in items:
            ids, at = encode(tok, item)
            seqs.append(ids)
            labels.append(e)
            positions.append(at)
    return seqs, labels, positions


def compute_routers(p: MoEPlan, stack) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(routers [layers, experts, hidden], shared gates [layers, 1, hidden] or None), in float32."""
    from mergesmith import routers

    c = p.recipe.config
    tok = p.tokenizer
    shared_defs = list(c.shared_experts) if p.gated_shared else []
    if not p.calibrate:  # mergekit: one computation for the experts and the gated shared expert
        gates = _mergekit_gates(p, stack, tok, list(c.experts) + shared_defs)
        warn_degenerate(gates[:, : len(c.experts)])
        return gates[:, : len(c.experts)], (gates[:, len(c.experts) :] if shared_defs else None)
    shared = _mergekit_gates(p, stack, tok, shared_defs) if shared_defs else None  # the shared gate by gate_mode
    seqs, labels, positions = _labelled(tok, [e.positive_prompts for e in c.experts])
    return routers.calibrated_gates(stack, _moe_layers(p, shared), seqs, labels, positions), shared


def warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> None:
    """mergekit's warning: layers whose router vectors are nearly dependent (condition number above 5)."""
    bad = [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].double())) > threshold]
    if bad:
        warn(
            f"the routers of layer(s) {', '.join(map(str, bad))} are nearly degenerate (their expert vectors are "
            "alike): the prompts may be too similar, and some experts will be little used"
        )


# --------------------------------------------------------------------------------------------------------------
# The routing report


def routing_report(p: MoEPlan, stack, routers_: torch.Tensor, shared: Optional[torch.Tensor]) -> Dict[str, Any]:
    """The share of each expert's tokens routed to it (routers.routing_report), on every expert's eval_prompts
    when each has some, else on the positive prompts (in-sample)."""
    from mergesmith import routers

    c = p.recipe.config
    held = all(e.eval_prompts for e in c.experts)
    seqs, labels, positions = _labelled(
        p.tokenizer, [(e.eval_prompts if held else e.positive_prompts) for e in c.experts]
    )
    got = routers.routing_report(stack, _moe_layers(p, shared), routers_, seqs, labels, positions)
    experts = [
        {
            "expert": e,
            "model": ex.source_model,
            "tokens": got["tokens"][e],
            "top1_share": got["overall"][e],
            "top1_share_by_layer": got["by_layer"][e],
        }
        for e, ex in enumerate(c.experts)
    ]
    return {
        "measured_on": "eval_prompts" if held else "positive_prompts (in-sample)",
        "router": "calibrated" if p.calibrate else c.gate_mode,
        "experts_per_token": c.experts_per_token,
        "experts": experts,
    }


def format_report(rep: Dict[str, Any]) -> str:
    rows = [
        f"routing report ({rep['router']} routers, on {rep['measured_on']}): share of each expert's tokens "
        "whose top-1 expert is that expert"
    ]
    for e in rep["experts"]:
        layers = " ".join(f"{s:.2f}" for s in e["top1_share_by_layer"])
        name = e["model"] if len(e["model"]) <= 32 else "..." + e["model"][-29:]
        rows.append(
            f"  expert {e['expert']} {name:32s} {e['top1_share']:6.1%} of {e['tokens']} tokens; by layer {layers}"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------
# Writing the output folder


def _h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(p: MoEPlan) -> Dict[str, str]:
    """What decides the output bytes, in named parts (as mergesmith.journal.fingerprint does for merges)."""
    from mergesmith.journal import file_stamp, input_files

    parts = {
        "mergesmith": __version__,
        "recipe": _h(p.recipe.config.model_dump(mode="json")),
        "seed": str(p.seed),
        "calibrate": str(p.calibrate),
        "layout": _h([list(zip(p.layout.files, p.layout.sizes)), [(t.name, str(t.dtype), t.shape) for t in p.tensors]]),
    }
    for ref, idx in p.models.items():
        parts[f"input {ref}"] = _h(
            [str(idx.path.resolve())] + [[n, str(t.dtype), t.shape, t.nbytes] for n, t in sorted(idx.tensors.items())]
        )
        parts.update({f"input {ref}: {label}": file_stamp(f) for label, f in input_files(idx).items()})
    return parts


def _continues(p: MoEPlan, partial: Path) -> bool:
    """`partial` holds an interrupted build of this same MoE, to be continued; a different one is refused."""
    from mergesmith.journal import differences
    from mergesmith.journal import resume_header

    head = resume_header(partial)
    if head is None:
        return False
    changed = differences(head.get("fingerprint", {}), fingerprint(p))
    if changed != "nothing":
        raise MergeError(
            f"{partial} holds an interrupted build that differs from this one (changed: {changed}); "
            "rerun with --restart to start over"
        )
    return all(
        (partial / f).is_file() and (partial / f).stat().st_size == s for f, s in zip(p.layout.files, p.layout.sizes)
    )


def _noise_seed(p: MoEPlan, model: str, name: str) -> int:
    from mergesmith.methods.rng import stream_key

    return stream_key(p.seed, model, name) & ((1 << 63) - 1)


def tensor_value(
    p: MoEPlan, t: OutTensor, routers_: torch.Tensor, shared: Optional[torch.Tensor], strict: bool = False
) -> torch.Tensor:
    """One output tensor. A copied tensor is converted once to the output dtype (its bytes unchanged when the
    dtypes agree); noise_scale adds N(0, noise_scale^2) noise, drawn from a generator keyed by (seed, model,
    tensor); residual_scale multiplies a down projection; both in float32, rounded once."""
    from mergesmith.execute import all_finite

    s = t.source
    if s.kind in ("router", "shared_router"):
        return (routers_ if s.kind == "router" else shared)[s.layer].to(t.dtype).contiguous()
    if s.kind == "zeros":
        return torch.zeros(t.shape, dtype=t.dtype)
    x = p.models[s.model].read(s.name)
    if not x.dtype.is_floating_point:
        return x
    if not all_finite(x):
        msg = f"model {s.model}: tensor {s.name} holds NaN or Inf values"
        if strict:
            raise MergeError(msg + " (refused under --strict)")
        warn(msg)
    ex = s.expert
    noise = ex.noise_scale if ex is not None else None
    scale = ex.residual_scale if ex is not None and s.residual else None
    if noise or scale is not None:
        x = x.float()
        if noise:
            x = (
                x
                + torch.randn(x.shape, generator=torch.Generator().manual_seed(_noise_seed(p, s.model, t.name))) * noise
            )
        if scale is not None:
            x = x * scale
    out = x.to(t.dtype)
    if t.dtype == torch.float16 and x.dtype != torch.float16 and not all_finite(out) and all_finite(x):
        raise MergeError(f"tensor {t.name} holds values beyond float16's range (65504); use dtype bfloat16")
    return out


def _write_tensors(p: MoEPlan, partial: Path, routers_, shared, resume: bool, quiet: bool, strict: bool) -> int:
    """Every tensor into its slot, one at a time, journaled; returns how many an interrupted build had done."""
    from tqdm import tqdm

    from mergesmith.io.writer import ShardWriter, write_index
    from mergesmith.journal import FORMAT, NAME, Journal, crc, done_tensors
    from mergesmith.outdir import write_checksums

    writer = ShardWriter(partial, p.layout, create=not resume)
    crcs: Dict[str, int] = {}
    if resume:
        crcs = {n: c for n, c in done_tensors(partial).items() if n in p.layout.slots and crc(writer.read_back(n)) == c}
    else:
        (partial / NAME).write_text(
            json.dumps({"format": FORMAT, "seed": p.seed, "fingerprint": fingerprint(p)}) + "\n", encoding="utf-8"
        )
    journal = Journal(partial, None, fresh=False)
    todo = [t for t in p.tensors if t.name not in crcs]
    ok = False
    try:
        for t in tqdm(todo, desc="writing", unit="tensor", disable=quiet, dynamic_ncols=True):
            c = crc(writer.write(t.name, tensor_value(p, t, routers_, shared, strict)))
            journal.record(t.name, c)
            crcs[t.name] = c
        ok = True
    finally:
        journal.close()
        writer.close(sync=ok)
    write_index(partial, p.layout)
    write_checksums(partial, p.layout, crcs)
    return len(p.tensors) - len(todo)


def recipe_copy(p: MoEPlan) -> str:
    """mergesmith_config.yml: the recipe as validated (calibrate written out when the option asked for it), where
    relative model paths led, and the seed."""
    head = f"# built with mergesmith {__version__} (mergesmith moe)\n"
    relative = [
        (ref, idx.path)
        for ref, idx in p.models.items()
        if not Path(ref).is_absolute() and Path(ref).resolve() != idx.path.resolve()
    ]
    if relative:
        head += "# relative model paths, as found when building:\n"
        head += "".join(f"#   {ref} -> {path.resolve()}\n" for ref, path in relative)
    head += f"# seed: {p.seed}  (reproduce with: mergesmith moe mergesmith_config.yml OUT_DIR --random-seed {p.seed})\n"
    data = p.recipe.config.model_dump(exclude_none=True, mode="json")
    data.pop("calibrate", None)
    if p.calibrate:
        data["calibrate"] = True
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def model_card(p: MoEPlan, name: str, report: Optional[Dict[str, Any]]) -> str:
    from mergesmith.io.resolve import is_hub_id

    c = p.recipe.config
    hub = [r.split("@")[0] for r in p.models if is_hub_id(r)]
    front = [
        "---",
        "base_model:" if hub else "base_model: []",
        *[f"- {h}" for h in hub],
        "library_name: transformers",
        "tags:",
        "- mergesmith",
        "- moe",
        "- merge",
        "---",
        "",
    ]
    gate = "calibrated by logistic regression on the positive prompts" if p.calibrate else f"gate_mode {c.gate_mode}"
    lines = [
        f"# {name}",
        "",
        f"A {p.family.name} mixture of experts built with mergesmith {__version__} from dense fine-tunes of one base.",
        "",
        f"* attention, embeddings and norms: {c.base_model}",
    ]
    lines += [f"* expert {i}: {e.source_model}" for i, e in enumerate(c.experts)]
    lines += [f"* shared expert: {e.source_model}" for e in c.shared_experts or []]
    lines += [f"* routers: {gate}; {c.experts_per_token} expert(s) per token", ""]
    if report:
        lines += ["## Routing", "", "```", format_report(report), "```", ""]
    lines += ["## Configuration", "", "```yaml", recipe_copy(p).rstrip(), "```", ""]
    return "\n".join(front + lines)


def _tokenizer_ref(p: MoEPlan) -> str:
    c = p.recipe.config
    return c.tokenizer_source if c.tokenizer_source and c.tokenizer_source != "base" else c.base_model


def _copy_tokenizer(p: MoEPlan, out: Path) -> None:
    import shutil

    from mergesmith.io.index import model_folder, read_json_object
    from mergesmith.vocab import check_tokenizer_files

    ref = _tokenizer_ref(p)
    files = check_tokenizer_files(model_folder(p.models[ref]), ref)
    if not files:
        warn(f"model {ref} has no tokenizer files; the output has no tokenizer")
    for name, src in files:
        shutil.copyfile(src, out / name)
    if p.template is not None:
        tc_path = out / "tokenizer_config.json"
        tc = read_json_object(tc_path) if tc_path.exists() else {}
        tc["chat_template"] = p.template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(p.template, encoding="utf-8")
        (out / "chat_template.json").unlink(missing_ok=True)


def write_folder(p: MoEPlan, out: Path, tokenizer: bool, card: bool, report: Optional[Dict[str, Any]]) -> None:
    from mergesmith.folder import _copy_generation_config
    from mergesmith.io.index import model_folder

    (out / "config.json").write_text(json.dumps(p.config, indent=2, sort_keys=True) + "\n")
    _copy_generation_config(model_folder(p.base), out)
    if tokenizer:
        _copy_tokenizer(p, out)
    (out / "mergesmith_config.yml").write_text(recipe_copy(p), encoding="utf-8")
    if card:
        (out / "README.md").write_text(model_card(p, out.name, report), encoding="utf-8")
    if report is not None:
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


REPORT = "routing_report.json"
OTHER_BYTES = 1 << 20  # config, card, recipe copy and report: far below this


def _prepare(p: MoEPlan, recipe: str, tokenizer: bool, report: bool) -> bool:
    """Before any work: the base's tokenizer and the prompts, the tokenizer files the output takes, and the chat
    template. Returns whether there will be a routing report."""
    from mergesmith.chat_templates import choose_template
    from mergesmith.io.index import model_folder
    from mergesmith.vocab import check_tokenizer_files

    c = p.recipe.config
    report = report and all(e.eval_prompts or e.positive_prompts for e in c.experts)
    if c.gate_mode in PROMPT_MODES or p.calibrate:
        p.tokenizer = load_tokenizer(p)
    elif report:
        try:
            p.tokenizer = load_tokenizer(p)
        except MergeError as e:
            warn(f"no routing report: {e}")
            report = False
    ref = _tokenizer_ref(p)
    if tokenizer:
        check_tokenizer_files(model_folder(p.models[ref]), ref)
    spec = p.recipe.config.chat_template
    if spec and tokenizer:
        p.template = choose_template(
            spec,
            [model_folder(m) for m in p.models.values()],
            model_folder(p.base),
            Path(recipe).resolve().parent,
            p.recipe.at("chat_template"),
        )
    return report


def _fresh(p: MoEPlan, partial: Path) -> None:
    from mergesmith import outdir

    outdir.fresh_partial(partial)
    try:
        tok = sum(f.stat().st_size for f in Path(p.models[_tokenizer_ref(p)].path).glob("tokenizer*") if f.is_file())
        outdir.check_disk(partial, outdir.disk_need(sum(p.layout.sizes), list(p.layout.slots), OTHER_BYTES + tok))
    except MergeError:
        outdir.remove_ours(partial)
        raise


@dataclass
class Built:
    plan: MoEPlan
    report: Optional[Dict[str, Any]]
    resumed: int
    seconds: float


def _build_into(p: "MoEPlan", partial: Path, dev, may_resume: bool, quiet: bool, strict: bool, report: bool):
    """Routers, then every tensor into `partial` (continuing an interrupted build there), then the routing report:
    (tensors already done, report or None)."""
    from mergesmith.routers import SMALL_HIDDEN, Stack, one_thread

    stack = Stack(p.base, dev)
    with one_thread(p.hidden < SMALL_HIDDEN):
        routers_, shared = compute_routers(p, stack)
    resume = may_resume and _continues(p, partial)
    if not resume:
        _fresh(p, partial)
    done = _write_tensors(p, partial, routers_, shared, resume, quiet, strict)
    with one_thread(p.hidden < SMALL_HIDDEN):
        rep = routing_report(p, stack, routers_, shared) if report else None
    return done, rep


def build_moe(
    recipe: str,
    out_dir: str,
    *,
    device: str = "cpu",
    seed: Optional[int] = None,
    calibrate: bool = False,
    allow_all_same: bool = False,
    out_shard_size: str = "5GB",
    overwrite: bool = False,
    restart: bool = False,
    quiet: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    strict: bool = False,
    report: bool = True,
    dtype: Optional[str] = None,
) -> Built:
    """The whole `mergesmith moe`: validate, compute the routers, stream the tensors into OUT_DIR.partial/ and put
    the finished folder in place (what may be replaced, and the lock: mergesmith.outdir). An interrupted build is
    continued by the same command; `restart` starts over."""
    from mergesmith import outdir
    from mergesmith.device import pick_device
    from mergesmith.io.writer import parse_size
    from mergesmith.journal import resume_header
    from mergesmith.verify import verify_weights

    t0 = time.monotonic()
    out = outdir.output_path(out_dir)
    dev = pick_device(device)
    shard = parse_size(out_shard_size)
    r = load_moe(recipe, strict)
    if dtype is not None:
        if dtype not in DTYPES:
            raise MergeError(f"--dtype {dtype!r} is not a dtype; use bfloat16, float16 or float32")
        r.config.dtype = dtype
    head = None if restart else resume_header(outdir.partial_of(out))
    if seed is None and head is not None:
        seed = head.get("seed")
    folder = Path(recipe).resolve().parent
    p = make_moe_plan(r, folder, seed=seed, calibrate=calibrate, allow_all_same=allow_all_same, shard_size=shard)
    report = _prepare(p, recipe, copy_tokenizer, report)
    for n in p.notes:
        warn(n)
    inputs = [("the recipe", Path(recipe))] + [
        it for ref, idx in p.models.items() for it in outdir.model_inputs(f"model {ref}", idx)
    ]
    with outdir.claim(out, inputs, overwrite, f"mergesmith moe {recipe} {out_dir}") as partial:
        done, rep = _build_into(p, partial, dev, not restart, quiet, strict, report)
        write_folder(p, partial, copy_tokenizer, write_model_card, rep)
        verify_weights(partial, {t.name: (t.dtype, t.shape) for t in p.tensors})
        outdir.finish(partial, out)
    if done:
        log.info(f"resumed {partial}: {done} of {len(p.tensors)} tensors were already done")
    return Built(p, rep, done, time.monotonic() - t0)
