"""A model's layer stacks, found from its tensor names, and the config.json keys that count them.

A stack is a run of numbered layers: `model.layers.N.`, `transformer.h.N.`, `encoder.block.N.`. A decoder-only LLM
has one; T5 and Whisper have an encoder and a decoder stack, CLIP a text and a vision tower, a Llava-style VLM a
language model and a vision tower. Each stack is a module of a `modules:` recipe (mergekit's names: `encoder`,
`decoder`, `text_decoder`, `vision_tower`, ...; its tensor prefix works too), and each has the config.json keys that
count its layers (`num_decoder_layers`, `text_config.num_hidden_layers`, `n_layer`, ...), found by the stack's role
and the config's own keys rather than a table per architecture.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from mergesmith.params import _LAYER_RE

# Words in a stack's distinguishing prefix that tell its role.
_ROLE_WORDS = (
    ("vision", ("vision", "visual", "image")),
    ("audio", ("audio", "speech")),
    ("text", ("text", "language")),
)
# Module names per role, mergekit's first (its VLM definitions say text_decoder and vision_tower).
_ROLE_NAMES = {
    "encoder": ("encoder",),
    "decoder": ("decoder",),
    "audio": ("audio_tower", "audio_model"),
    "text": ("text_decoder", "text_model", "language_model"),
    "vision": ("vision_tower", "vision_model"),
}
# Where a stack's layer count lives: sub-configs by role ("" is the top level).
_SCOPES = {
    "vision": ("vision_config",),
    "audio": ("audio_config",),
    "text": ("text_config", ""),
    "encoder": ("encoder", ""),
    "decoder": ("decoder", ""),
    None: ("", "text_config"),
}
_GENERAL_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth")
_ENCODER_KEYS = ("encoder_layers", "num_encoder_layers", "num_layers", "num_hidden_layers")  # T5: num_layers
_DECODER_KEYS = ("decoder_layers", "num_decoder_layers")
# Per-layer lists that follow the layers they describe (besides every `layer_*` list), and lists of layer indices.
_PER_LAYER = ("no_rope_layers", "layers_block_type")
_INDEX_LISTS = ("mlp_only_layers",)
# Non-layer tensors that come before the layers (from a slice run's first model): embeddings, stems, pre-norms.
_FRONT_RE = re.compile(
    r"embed(?!_out)|wte|wpe|word_embeddings|tok_embeddings|conv\d|patch|pre_?layr?norm|"
    r"class_embedding|cls_token|^shared\.weight$"
)


def is_front(name: str) -> bool:
    """A non-layer tensor that precedes the layers (embeddings, convolution stems, pre-norms)."""
    return bool(_FRONT_RE.search(name)) and "lm_head" not in name


@dataclass(frozen=True)
class Stack:
    """One stack of numbered layers: tensor `prefix + N + .rest` is of layer N."""

    prefix: str  # "model.layers.", "decoder.block."
    root: str  # the part of the prefix no other stack shares ("decoder."); "" for a model's only stack
    role: Optional[str]  # encoder, decoder, text, vision, audio; None for a model's only stack or an unknown one
    names: Tuple[str, ...]  # what `modules:` may call it, the usual name first
    held: Dict[int, Tuple[str, ...]] = field(compare=False)  # tensor names of each layer

    @property
    def module(self) -> str:
        return self.names[0]

    @property
    def count(self) -> int:
        """Layers up to the last one held (a gap is the planner's to refuse)."""
        return max(self.held, default=-1) + 1


@dataclass(frozen=True)
class Anatomy:
    """A model's stacks, and the module name(s) of its tensors outside every stack (a projector, shared
    embeddings), which a single-stack model does not have."""

    stacks: Tuple[Stack, ...]
    outside: Tuple[str, ...]

    @property
    def multi(self) -> bool:
        return len(self.stacks) > 1

    def stack(self, prefix: Optional[str]) -> Optional[Stack]:
        return next((s for s in self.stacks if s.prefix == prefix), None)

    def find(self, module: str) -> Optional[Stack]:
        """The stack a `modules:` entry names (None for the outside module or an unknown name)."""
        return next((s for s in self.stacks if module in s.names), None)

    def module_names(self) -> List[str]:
        return [s.module for s in self.stacks] + list(self.outside[:1])

    def owner(self, name: str) -> Optional[str]:
        """The prefix of the stack a non-layer tensor belongs with; None for one outside every stack."""
        if len(self.stacks) == 1:
            return self.stacks[0].prefix
        return next((s.prefix for s in self.stacks if s.root and name.startswith(s.root)), None)


def layer_of(name: str) -> Optional[Tuple[str, int]]:
    """(stack prefix, layer) of a tensor name, None for a non-layer tensor."""
    m = _LAYER_RE.search(name)
    return None if m is None else (name[: m.start(1)], int(m.group(1)))


def _root(prefix: str, prefixes: Sequence[str]) -> str:
    """The shortest leading part of `prefix` (whole dotted parts) that no other stack's prefix starts with."""
    parts = prefix.rstrip(".").split(".")
    for k in range(1, len(parts) + 1):
        cand = ".".join(parts[:k]) + "."
        if not any(o != prefix and o.startswith(cand) for o in prefixes):
            return cand
    return prefix


def _role(root: str) -> Optional[str]:
    parts = root.rstrip(".").split(".")
    for role, words in _ROLE_WORDS:
        if any(w in p for p in parts for w in words):
            return role
    return next((p for p in ("encoder", "decoder") if p in parts), None)


def _roles(roots: Sequence[str]) -> List[Optional[str]]:
    """Each stack's role; a role two stacks share is nobody's. The one stack left beside vision or audio towers
    is the language model (Qwen2-VL's `model.layers` beside `visual.blocks`)."""
    roles = [_role(r) for r in roots]
    roles = [r if roles.count(r) == 1 else None for r in roles]
    if roles.count(None) == 1 and len(roles) > 1 and all(r in (None, "vision", "audio") for r in roles):
        roles[roles.index(None)] = "text"
    return roles


def _names(prefix: str, root: str, role: Optional[str]) -> List[str]:
    own = [root.rstrip("."), prefix.rstrip(".")]
    if role is None:
        return own
    names = list(_ROLE_NAMES[role])
    last = root.rstrip(".").split(".")[-1]
    if last in ("text_model", "vision_model"):  # CLIP's towers: their own names first
        names.remove(last)
        names.insert(0, last)
    return names + own


def _outside_names(roles: Sequence[Optional[str]]) -> Tuple[str, ...]:
    if len(roles) < 2:
        return ()
    names = ["shared"] if {"encoder", "decoder"} & set(roles) else []
    names += ["multi_modal_projector"] if {"text", "vision"} <= set(roles) else []
    return tuple(names + ["default"])


def anatomy(tensors: Iterable[str]) -> Anatomy:
    """A model's stacks from its tensor names, in prefix order."""
    held: Dict[str, Dict[int, List[str]]] = {}
    for name in tensors:
        at = layer_of(name)
        if at is not None:
            held.setdefault(at[0], {}).setdefault(at[1], []).append(name)
    prefixes = sorted(held)
    if len(prefixes) == 1:
        p = prefixes[0]
        return Anatomy((Stack(p, "", None, ("default", p.rstrip(".")), _frozen(held[p])),), ())
    roots = [_root(p, prefixes) for p in prefixes]
    roles = _roles(roots)
    names = [_names(p, r, role) for p, r, role in zip(prefixes, roots, roles)]
    taken = [n for ns in names for n in dict.fromkeys(ns)]
    stacks = tuple(
        Stack(p, r, role, tuple(dict.fromkeys(n for n in ns if taken.count(n) == 1)), _frozen(held[p]))
        for p, r, role, ns in zip(prefixes, roots, roles, names)
    )
    return Anatomy(stacks, _outside_names(roles))


def _frozen(held: Dict[int, List[str]]) -> Dict[int, Tuple[str, ...]]:
    return {i: tuple(v) for i, v in sorted(held.items())}


# -- config.json ------------------------------------------------------------------------------------------------------
def _scopes(stack: Stack, multi: bool) -> List[str]:
    """The config scopes ("" the top level, else a sub-config's key) that hold the stack's count; none for a stack
    of a many-stack model whose role is unknown."""
    if multi and stack.role is None:
        return []
    return list(_SCOPES[stack.role])


def _scope(cfg: Dict[str, Any], scope: str) -> Optional[Dict[str, Any]]:
    sub = cfg if scope == "" else cfg.get(scope)
    return sub if isinstance(sub, dict) else None


def _keys(stack: Stack, scope: str) -> Tuple[str, ...]:
    if scope == "" and stack.role == "encoder":
        return _ENCODER_KEYS
    if scope == "" and stack.role == "decoder":
        return _DECODER_KEYS
    return _GENERAL_KEYS


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count_keys(stack: Stack, cfg: Optional[Dict[str, Any]], multi: bool) -> List[Tuple[str, str]]:
    """(scope, key) of each config key that counts the stack's layers, the primary one first: the first one
    present, then its aliases that agree with it (GPT-2's `n_layer` beside a `num_hidden_layers`). With none
    present, the key to write."""
    cfg = cfg or {}
    found = [
        (sc, k)
        for sc in _scopes(stack, multi)
        if _scope(cfg, sc) is not None
        for k in _keys(stack, sc)
        if _is_count(_scope(cfg, sc).get(k))
    ]
    if found:
        first = _scope(cfg, found[0][0])[found[0][1]]
        return [(sc, k) for sc, k in found if _scope(cfg, sc)[k] == first]
    scopes = [sc for sc in _scopes(stack, multi) if _scope(cfg, sc) is not None]
    if not scopes:
        return []
    if stack.role == "decoder" and scopes[0] == "" and "num_layers" in cfg:  # T5 names it num_decoder_layers
        return [("", "num_decoder_layers")]
    return [(scopes[0], _keys(stack, scopes[0])[0])]


def claimed_layers(stack: Stack, cfg: Optional[Dict[str, Any]], multi: bool) -> Optional[Tuple[str, int]]:
    """(key, count) a config.json gives for the stack, None when it gives none."""
    keys = count_keys(stack, cfg, multi)
    if not keys:
        return None
    sc, k = keys[0]
    v = (_scope(cfg or {}, sc) or {}).get(k)
    return (k if sc == "" else f"{sc}.{k}", v) if _is_count(v) else None


Sources = Sequence[Tuple[str, int]]  # (model, its layer) of each output layer of a stack


def changed_stacks(an: Anatomy, template: str, out: Dict[Optional[str], Sources]) -> List[Stack]:
    """The template's stacks whose output layers are not its own layers in order."""
    return [s for s in an.stacks if list(out.get(s.prefix, ())) != [(template, i) for i in range(s.count)]]


def uncountable(
    an: Anatomy, cfg: Optional[Dict[str, Any]], template: str, out: Dict[Optional[str], Sources]
) -> Optional[Stack]:
    """A changed stack whose count no config key can hold (a many-stack model of unknown layout), else None."""
    if cfg is None:
        return None
    return next((s for s in changed_stacks(an, template, out) if not count_keys(s, cfg, an.multi)), None)


def update_counts(
    cfg: Dict[str, Any],
    an: Anatomy,
    template: str,
    out: Dict[Optional[str], Sources],
    configs: Dict[str, Optional[Dict[str, Any]]],
) -> Dict[str, Any]:
    """The template's config.json with the layer counts of the output: unchanged when no stack moved; else every
    stack's count keys (aliases with them) set, and each changed stack's per-layer lists following its layers."""
    changed = changed_stacks(an, template, out)
    if not changed:
        return cfg
    cfg = copy.deepcopy(cfg)
    for stack in an.stacks:  # unchanged ones too: T5 takes a missing num_decoder_layers from the encoder's
        for sc, k in count_keys(stack, cfg, an.multi):
            _scope(cfg, sc)[k] = len(out.get(stack.prefix, ()))
    for stack in changed:
        for sc in _scopes(stack, an.multi):
            if _scope(cfg, sc) is not None and not (sc == "" and stack.role in ("encoder", "decoder")):
                _follow_lists(_scope(cfg, sc), sc, out.get(stack.prefix, ()), configs)
    return cfg


def _follow_lists(sub: Dict[str, Any], sc: str, layers: Sources, configs: Dict[str, Optional[Dict[str, Any]]]):
    """Per-layer lists (layer_types, ...) take each output layer's entry from its source model; index lists
    (mlp_only_layers) name the output layers whose source layer they named."""
    for key, value in list(sub.items()):
        if not isinstance(value, list):
            continue
        srcs = [(_scope(configs.get(ref) or {}, sc) or {}).get(key) for ref, _ in layers]
        if key in _INDEX_LISTS:
            sub[key] = [o for o, ((_, i), src) in enumerate(zip(layers, srcs)) if isinstance(src, list) and i in src]
        elif value and (key.startswith("layer_") or key in _PER_LAYER):  # [] has no entry to spread
            sub[key] = [
                src[i] if isinstance(src, list) and i < len(src) else value[min(i, len(value) - 1)]
                for (_, i), src in zip(layers, srcs)
            ]
