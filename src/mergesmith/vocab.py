"""Output vocabulary across models whose tokenizers differ (mergekit's `tokenizer_source` / `tokenizer:`).

The output tokenizer is built first (the base's, one model's, or the union), then every input's embedding and
lm_head rows are permuted into its ids, and rows a model lacks are filled, before the merge method runs:

- a token the model has: the model's own row (unless the recipe forces a source for it);
- else, for a token listed under `tokenizer: tokens:`, its `source`: a model's row for that token, a model's row for
  another token (`kind: model_token`), or zeros (`kind: zero`);
- else the row of the only model that has the token, else the base model's row, else the mean of the rows of the
  models that have it (zeros, with a warning, when none has it);
- rows past the vocabulary (`pad_to_multiple_of`) get the mean of the model's rows.

`build_vocabulary` reads tokenizers (I/O); `permute_rows` is a pure function of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mergesmith.errors import MergeError, warn


@dataclass(frozen=True)
class TokenSource:
    """A `tokenizer: tokens:` entry: where a token's row comes from, and whether to use it even where a model has
    the token (`force`)."""

    kind: str  # "model", "model_token" or "zero"
    model: Optional[str] = None
    token_id: Optional[int] = None
    token: Optional[str] = None
    force: bool = False


@dataclass
class Vocabulary:
    tokenizer: Any  # the output tokenizer (transformers)
    vocab: Dict[str, int]  # output token -> id
    size: int  # output rows (after pad_to_multiple_of)
    perms: Dict[str, np.ndarray]  # model -> per output id, the model's row or -1
    originals: Dict[str, Dict[str, int]]  # model -> its own token -> id
    overrides: Dict[str, TokenSource] = field(default_factory=dict)
    base: Optional[str] = None

    @property
    def n_tokens(self) -> int:
        return max(self.vocab.values()) + 1 if self.vocab else 0


def parse_tokens(recipe, tokens: Optional[Dict[str, Any]]) -> Dict[str, TokenSource]:
    """The recipe's `tokenizer: tokens:` mapping, checked, with line numbers in errors."""
    out: Dict[str, TokenSource] = {}
    for tok, spec in (tokens or {}).items():
        where = recipe.at("tokenizer", "tokens", tok)
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise MergeError(f"{where}: token {tok!r} needs a mapping like '{{source: MODEL, force: false}}'")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise MergeError(f"{where}: 'force' must be true or false")
        src = spec.get("source")
        if src is None:
            out[tok] = TokenSource("auto", force=force)
        elif isinstance(src, str):
            out[tok] = TokenSource("model", model=src, force=force)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            out[tok] = TokenSource("zero", force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            tid, ttok = src.get("token_id"), src.get("token")
            if not isinstance(src.get("model"), str) or (tid is None) == (ttok is None):
                raise MergeError(
                    f"{where}: a model_token source needs 'model:' and exactly one of 'token_id:' or 'token:'"
                )
            out[tok] = TokenSource("model_token", model=src["model"], token_id=tid, token=ttok, force=force)
        else:
            raise MergeError(
                f"{where}: source of token {tok!r} must be a model, {{kind: zero}} or "
                "{kind: model_token, model: ..., token_id|token: ...}"
            )
    return out


TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
]


def check_tokenizer_files(folder: Path, who: str, names: List[str] = TOKENIZER_FILES) -> List[Tuple[str, Path]]:
    """(name, resolved path) of the tokenizer files `names` a model folder has, each a regular file inside it
    (safe_member: a link to a secret elsewhere would end up in the output) and, for JSON, an object."""
    from mergesmith.io.index import MAX_JSON, has_member, read_json_object, safe_member

    found = []
    for name in names:
        if not has_member(folder, name):
            continue
        try:
            p = safe_member(folder, name)
            if name.endswith(".json"):
                read_json_object(p)
            elif p.stat().st_size > MAX_JSON:  # the cap of JSON files: the largest real tokenizer files are ~35 MB
                raise MergeError(
                    f"{folder}: {name} is {p.stat().st_size / 2**20:.0f} MiB, too large for a "
                    f"tokenizer file (at most {MAX_JSON / 2**20:g} MiB); refused"
                )
        except MergeError as e:
            raise MergeError(f"model {who}: tokenizer file {e}") from None
        found.append((name, p))
    return found


def _file_arguments(folder: Path, who: str) -> None:
    """Older transformers open the `*_file` paths a tokenizer_config.json names (vocab_file, tokenizer_file, ...)
    as they are: one leading to an existing file outside the folder is refused."""
    from mergesmith.io.index import has_member, lies_inside, member_json

    if not has_member(folder, "tokenizer_config.json"):
        return
    for key, v in member_json(folder, "tokenizer_config.json").items():
        if key.endswith("_file") and isinstance(v, str) and v:
            target = (folder / v).resolve()
            if target.exists() and not lies_inside(folder, target):
                raise MergeError(
                    f"model {who}: tokenizer_config.json's {key} names {v}, outside the model folder; refused"
                )


def _load_tokenizer(folder: Path, who: str):
    from transformers import AutoTokenizer

    extra = [f"additional_chat_templates/{p.name}" for p in sorted(folder.glob("additional_chat_templates/*.jinja"))]
    check_tokenizer_files(folder, who, [*TOKENIZER_FILES, "config.json", *extra])
    _file_arguments(folder, who)
    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        reason = " ".join(str(e).split())[:200]
        raise MergeError(
            f"model {who}: its tokenizer does not load ({type(e).__name__}: {reason}); "
            "a tokenizer merge needs every model's tokenizer"
        ) from None


def union_tokenizer(base_tok, toks: Dict[str, Any], rows: Dict[str, int]):
    """mergekit's union: the base tokenizer plus every other token (ordinary ones first, then special/added tokens
    with their settings), each only if its id is below that model's embedding rows."""
    import tempfile

    from transformers import AutoTokenizer

    plain: Dict[str, None] = {}
    added: Dict[str, Any] = {}
    for ref, tok in toks.items():
        dec = tok.added_tokens_decoder
        added_names = {info.content for info in dec.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows[ref] and t not in added_names:
                plain.setdefault(t, None)
        for i, info in sorted(dec.items()):
            if i < rows[ref]:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as d:
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False)
    have = set(res.get_vocab())
    new_plain = [t for t in plain if t not in have and t not in added]
    if new_plain:
        res.add_tokens(new_plain)
    new_added = [info for name, info in added.items() if name not in have]
    for info in new_added:
        res.add_tokens([info], special_tokens=bool(getattr(info, "special", False)))
    return res


def _output_tokenizer(recipe, source: str, toks: Dict[str, Any], rows: Dict[str, int], base: str):
    """The tokenizer the output gets: the base's, the union of every model's, or one model's."""
    c = recipe.config
    where = recipe.at("tokenizer", "source") if c.tokenizer is not None else recipe.at("tokenizer_source")
    if source == "base":
        return toks[base]
    if source == "union":
        return union_tokenizer(toks[base], toks, rows)
    if source in toks:
        return toks[source]
    raise MergeError(f"{where}: tokenizer source {source!r} is not 'base', 'union' or one of the models")


def _check_overrides(recipe, overrides: Dict[str, Any], toks: Dict[str, Any], rows: Dict[str, int]) -> None:
    """Every `tokens:` source names a recipe model, and a model_token source a token that model has."""
    for tok, s in overrides.items():
        if s.model is not None and s.model not in toks:
            raise MergeError(
                f"{recipe.at('tokenizer', 'tokens', tok)}: model {s.model} is not one of the recipe's models"
            )
        if s.kind == "model_token":
            src_vocab = toks[s.model].get_vocab()
            tid = s.token_id if s.token_id is not None else src_vocab.get(s.token, -1)
            if not 0 <= tid < rows[s.model]:
                raise MergeError(
                    f"{recipe.at('tokenizer', 'tokens', tok)}: token "
                    f"{s.token if s.token is not None else s.token_id!r} is not in model {s.model}"
                )


def _permutations(vocab: Dict[str, int], toks: Dict[str, Any], rows: Dict[str, int], n: int) -> Dict[str, Any]:
    """Per model: for each output token id, the model's row holding it, or -1."""
    perms = {}
    for ref, tok in toks.items():
        mv = tok.get_vocab()
        p = np.full(n, -1, dtype=np.int64)
        for t, i in vocab.items():
            j = mv.get(t, -1)
            if 0 <= j < rows[ref]:
                p[i] = j
        perms[ref] = p
    return perms


def build_vocabulary(recipe, folders: Dict[str, Path], rows: Dict[str, int], base: Optional[str]) -> Vocabulary:
    """The output tokenizer and each model's permutation into it. `rows`: each model's embedding rows."""
    c = recipe.config
    source = c.tokenizer.source if c.tokenizer is not None else c.tokenizer_source
    overrides = parse_tokens(recipe, c.tokenizer.tokens if c.tokenizer is not None else None)
    pad = c.tokenizer.pad_to_multiple_of if c.tokenizer is not None else None
    if pad is not None and pad < 1:
        raise MergeError(f"{recipe.at('tokenizer', 'pad_to_multiple_of')}: pad_to_multiple_of must be >= 1")
    base = base or next(iter(folders))
    toks = {ref: _load_tokenizer(f, ref) for ref, f in folders.items()}
    out = _output_tokenizer(recipe, source, toks, rows, base)
    missing = [t for t in overrides if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    vocab = dict(out.get_vocab())
    _check_overrides(recipe, overrides, toks, rows)
    n = max(vocab.values()) + 1
    size = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    perms = _permutations(vocab, toks, rows, n)
    return Vocabulary(out, vocab, size, perms, {r: dict(t.get_vocab()) for r, t in toks.items()}, overrides, base)


def _forced(v: Vocabulary) -> "np.ndarray":
    """Output token ids whose `tokens:` setting is forced (`force: true`): every model takes the set row."""
    forced = np.zeros(v.n_tokens, dtype=bool)
    for t, s in v.overrides.items():
        if s.force and t in v.vocab:
            forced[v.vocab[t]] = True
    return forced


def _default_row(
    v: Vocabulary, tensors: Dict[str, torch.Tensor], i: int, tok: Optional[str], having: List[str], shape, dev
) -> Optional[torch.Tensor]:
    """The row for output token i where a model lacks it (or it is forced), by the module docstring's rules; None
    when no model has it (a zero row, reported)."""
    s = v.overrides.get(tok) if tok is not None else None
    if s is not None and s.kind == "zero":
        return torch.zeros(shape, device=dev)
    if s is not None and s.kind == "model_token":
        tid = s.token_id if s.token_id is not None else v.originals[s.model][s.token]
        return tensors[s.model][tid]
    if s is not None and s.kind == "model":
        if s.model not in tensors or v.perms[s.model][i] < 0:
            raise MergeError(f"token {tok!r}: its source model {s.model} does not have it")
        return tensors[s.model][int(v.perms[s.model][i])]
    if len(having) == 1 or v.base in having:
        m = having[0] if len(having) == 1 else v.base
        return tensors[m][int(v.perms[m][i])]
    if not having:
        return None
    acc = torch.zeros(shape, device=dev, dtype=torch.float64)
    for m in having:
        acc += tensors[m][int(v.perms[m][i])].double()
    return (acc / len(having)).float()


def permute_rows(v: Vocabulary, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each model's vocabulary-indexed tensor [rows, ...] laid out in the output vocabulary [v.size, ...], with the
    fill rules of the module docstring. Pure: float32 tensors in, float32 tensors out."""
    models = list(tensors)
    first = tensors[models[0]]
    shape, dev = first.shape[1:], first.device
    present = {m: v.perms[m] >= 0 for m in models}
    forced = _forced(v)
    need = forced.copy()
    for m in models:
        need |= ~present[m]
    defaults: Dict[int, torch.Tensor] = {}
    unfound: List[str] = []
    id_to_tok = {i: t for t, i in v.vocab.items()}
    for i in np.nonzero(need)[0].tolist():
        tok = id_to_tok.get(i)
        row = _default_row(v, tensors, i, tok, [m for m in models if present[m][i]], shape, dev)
        if row is None:
            row = torch.zeros(shape, device=dev)
            if tok is not None:
                unfound.append(tok)
        defaults[i] = row
    if unfound:
        warn(
            f"{len(unfound)} token(s) of the output vocabulary are in no model (rows set to zero): "
            + ", ".join(repr(t) for t in unfound[:5])
        )
    return {m: _laid_out(v, tensors[m], v.perms[m], present[m] & ~forced, defaults, shape, dev) for m in models}


def _laid_out(v: Vocabulary, x: torch.Tensor, perm, own, defaults: Dict[int, torch.Tensor], shape, dev) -> torch.Tensor:
    """One model's rows at their output ids (`own`, from its permutation `perm`), the default rows elsewhere, pad
    rows the mean of the others."""
    n = v.n_tokens
    new = torch.zeros((v.size, *shape), dtype=torch.float32, device=dev)
    idx = torch.from_numpy(np.nonzero(own)[0]).to(dev)
    new[idx] = x[torch.from_numpy(perm[own]).to(dev)].float()
    for i, row in defaults.items():
        if not own[i]:
            new[i] = row
    if v.size > n:
        new[n:] = new[:n].double().mean(dim=0).float()
    return new
