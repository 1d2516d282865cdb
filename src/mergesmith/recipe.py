"""The recipe: mergekit's YAML schema, parsed with line numbers and validated with pydantic.

mergekit's schema is a contract: a recipe that runs there runs here, verbatim. mergekit silently ignores keys it
does not know, so published recipes carry typos and stray keys; we run them with a warning that names the key, its
line and the closest known key, and refuse them only with `strict=True`. Wrong types are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesmith.errors import MergeError, did_you_mean, warn, where

Path_ = Tuple[Union[str, int], ...]

# --------------------------------------------------------------------------------------------------------------
# Schema (mergekit 0.1.5 field names and shapes)

Scalar = Union[bool, float, int, str]
ScalarOrGradient = Union[Scalar, List[Scalar]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class ConditionalParameter(_Model):
    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ConditionalParameter, List[ConditionalParameter], ScalarOrGradient]


class InputModelDefinition(_Model):
    model: str
    parameters: Optional[Dict[str, ParameterSetting]] = None


class InputSliceDefinition(_Model):
    model: str
    layer_range: Tuple[int, int]
    parameters: Optional[Dict[str, ParameterSetting]] = None


class OutputSliceDefinition(_Model):
    sources: List[InputSliceDefinition]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None


class OutputModuleDefinition(_Model):
    """One module of a `modules:` recipe (a layer stack: encoder, decoder, vision_tower, ...): its own slices, or
    its models merged whole."""

    slices: Optional[List[OutputSliceDefinition]] = None
    models: Optional[List[InputModelDefinition]] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None


class TokenizerConfig(_Model):
    source: str = "union"
    tokens: Optional[Dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


class MergeConfiguration(_Model):
    merge_method: str
    models: Optional[List[InputModelDefinition]] = None
    slices: Optional[List[OutputSliceDefinition]] = None
    modules: Optional[Dict[str, OutputModuleDefinition]] = None
    base_model: Optional[str] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None


# Known keys per level, for the unknown-key warnings (path patterns use '*' for list items and dict values).
_KNOWN: Dict[Path_, Tuple[str, ...]] = {
    (): tuple(MergeConfiguration.model_fields),
    ("models", "*"): tuple(InputModelDefinition.model_fields),
    ("slices", "*"): tuple(OutputSliceDefinition.model_fields),
    ("slices", "*", "sources", "*"): tuple(InputSliceDefinition.model_fields),
    ("tokenizer",): tuple(TokenizerConfig.model_fields),
    ("modules", "*"): tuple(OutputModuleDefinition.model_fields),
    ("modules", "*", "models", "*"): tuple(InputModelDefinition.model_fields),
    ("modules", "*", "slices", "*"): tuple(OutputSliceDefinition.model_fields),
    ("modules", "*", "slices", "*", "sources", "*"): tuple(InputSliceDefinition.model_fields),
}

DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


# --------------------------------------------------------------------------------------------------------------
# YAML with line numbers


# Bounds on the work a recipe can ask of the parser: mergekit recipes are a few KB, tens of values deep at most.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000  # values built, aliases expanded: a 600-byte "billion laughs" recipe stops here


# Control characters (but tab and line breaks) and unpaired surrogates: nothing a recipe means, and they garble
# messages and paths. A model reference may not even hold a tab or a line break.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_IN_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def short(value: Any, width: int = 60) -> str:
    """repr(value) cut to `width` characters: what a one-line message may quote of a user's value."""
    r = repr(value)
    return r if len(r) <= width else r[: width - 3] + "..."


class _Loader(yaml.SafeLoader):
    """PyYAML's composer recurses once per nesting level: refuse deep nesting before Python's stack runs out."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source, self.depth = source, 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise MergeError(
                    f"{where(self.source, line)}: YAML nested more than {MAX_DEPTH} levels deep; "
                    "a recipe needs a handful"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _compose(text: str, source: str) -> Tuple[yaml.Node, _Loader]:
    if len(text) > MAX_RECIPE_BYTES:
        raise MergeError(
            f"{source}: the recipe is {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES} "
            "(mergekit recipes are a few KB)"
        )
    loader = None
    try:
        loader = _Loader(text, source)  # the reader refuses unprintable characters here
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise MergeError(f"{source}: the recipe is empty")
    return node, loader


def _yaml_error(e: yaml.YAMLError, source: str) -> MergeError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        loc = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        if e.context == "expected a single document in the stream":
            return MergeError(
                f"{loc}: a second YAML document (after a '---' line) in a single recipe: remove that "
                "line, or give each document a name: (a multi-stage recipe, which `mergesmith run` "
                "and `mergesmith plan` take)"
            )
        return MergeError(f"{loc}: malformed YAML: {e.problem or e.context}")
    return MergeError(f"{source}: malformed YAML: {' '.join(str(e).split())}")


def _scalar(loader: _Loader, n: yaml.Node, source: str) -> Any:
    try:
        value = loader.construct_object(n, deep=True)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of thousands of digits
        raise MergeError(
            f"{where(source, n.start_mark.line + 1)}: bad YAML value: {' '.join(str(e).split())}"
        ) from None
    if isinstance(value, str) and _BAD_CHARS.search(value):
        raise MergeError(
            f"{where(source, n.start_mark.line + 1)}: the value {short(value)} holds a control or "
            "unpaired surrogate character; remove it"
        )
    return value


def _load_yaml(text: str, source: str) -> Tuple[Any, Dict[Path_, int], List[str]]:
    """Parse YAML, returning (data, {path: line}, warnings). Duplicate keys: same value warns, else an error."""
    node, loader = _compose(text, source)
    lines: Dict[Path_, int] = {}
    notes: List[str] = []
    built = [0]

    def build(n: yaml.Node, path: Path_, depth: int = 0) -> Any:
        line = n.start_mark.line + 1
        built[0] += 1
        if built[0] > MAX_NODES:
            raise MergeError(
                f"{where(source, line)}: the recipe expands to more than {MAX_NODES} values "
                "(YAML aliases repeat what they point to); write it out without them"
            )
        if depth > MAX_DEPTH:
            raise MergeError(f"{where(source, line)}: YAML nested too deeply")
        lines[path] = line
        if isinstance(n, yaml.MappingNode):
            return build_mapping(n, path, depth)
        if isinstance(n, yaml.SequenceNode):
            return [build(item, path + (i,), depth + 1) for i, item in enumerate(n.value)]
        return _scalar(loader, n, source)

    def build_mapping(n: yaml.MappingNode, path: Path_, depth: int) -> Dict[Any, Any]:
        out: Dict[Any, Any] = {}
        key_line: Dict[Any, int] = {}
        for knode, vnode in n.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise MergeError(f"{where(source, knode.start_mark.line + 1)}: a mapping key must be a plain value")
            key = _scalar(loader, knode, source)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                key = str(key)
            value = build(vnode, path + (key,), depth + 1)
            kline = knode.start_mark.line + 1
            if key in out:
                if out[key] == value:
                    notes.append(
                        f"{where(source, kline)}: {short(key)} is given twice (lines {key_line[key]} and "
                        f"{kline}) with the same value; using it once"
                    )
                else:
                    raise MergeError(
                        f"{where(source, kline)}: {short(key)} is given twice with different values "
                        f"(line {key_line[key]}: {short(out[key])}, line {kline}: {short(value)}); keep one"
                    )
            out[key] = value
            key_line[key] = kline
            lines[path + (key,)] = kline
        return out

    return build(node, ()), lines, notes


def _pattern_of(path: Path_) -> Path_:
    """A path with list indices and module names as '*'."""
    out = tuple("*" if isinstance(p, int) else p for p in path)
    return out[:1] + ("*",) + out[2:] if out[:1] == ("modules",) and len(out) > 1 else out


# --------------------------------------------------------------------------------------------------------------
# The parsed recipe


FOUND_AT = re.compile(r"^#   (.+?) -> (.+)$")


@dataclass
class Recipe:
    config: MergeConfiguration
    source: str = "<recipe>"
    text: str = ""
    lines: Dict[Path_, int] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    path: Optional[Path] = None  # the file it was read from (None for text)
    folder: Optional[Path] = None  # where relative model paths resolve: the file's folder
    pipeline: Optional[str] = None  # the multi-stage file this recipe is the last stage of (for the model card)

    def found_at(self) -> Dict[str, str]:
        """Where a merge found this recipe's relative model paths, from the comment lines mergesmith writes into
        an output's mergesmith_config.yml (`#   ref -> /absolute/path`): a recipe copy still runs, and
        `mergesmith inspect` still finds the inputs, from any working directory."""
        found = {}
        for line in self.text.splitlines():
            m = FOUND_AT.match(line)
            if m:
                found[m.group(1)] = m.group(2)
        return found

    def line(self, *path: Union[str, int]) -> Optional[int]:
        """The line of the nearest enclosing recipe key for `path`."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get(())

    def at(self, *path: Union[str, int]) -> str:
        return where(self.source, self.line(*path))

    # -- the inputs in recipe order: (model reference, path of its key) ------------------------------------------
    def model_lists(self) -> List[Tuple[Path_, List[InputModelDefinition]]]:
        """Each `models:` list with its recipe path: the recipe's, or a module's."""
        c = self.config
        out = [(("models",), c.models)] if c.models else []
        return out + [(("modules", n, "models"), m.models) for n, m in (c.modules or {}).items() if m.models]

    def slice_lists(self) -> List[Tuple[Path_, List[OutputSliceDefinition]]]:
        """Each `slices:` list with its recipe path: the recipe's, or a module's."""
        c = self.config
        out = [(("slices",), c.slices)] if c.slices else []
        return out + [(("modules", n, "slices"), m.slices) for n, m in (c.modules or {}).items() if m.slices]

    def input_models(self) -> List[str]:
        """The models the recipe lists (in `models:` and slice sources), in order, each once."""
        refs = [m.model for _, models in self.model_lists() for m in models]
        refs += [src.model for _, slices in self.slice_lists() for s in slices for src in s.sources]
        return list(dict.fromkeys(refs))

    def model_refs(self) -> List[Tuple[str, Path_]]:
        c = self.config
        refs: List[Tuple[str, Path_]] = []
        for path, models in self.model_lists():
            refs += [(m.model, path + (i, "model")) for i, m in enumerate(models)]
        for path, slices in self.slice_lists():
            for si, s in enumerate(slices):
                refs += [(src.model, path + (si, "sources", j, "model")) for j, src in enumerate(s.sources)]
                if s.base_model:
                    refs.append((s.base_model, path + (si, "base_model")))
        if c.base_model:
            refs.append((c.base_model, ("base_model",)))
        if c.tokenizer_source and c.tokenizer_source not in ("base", "union"):
            refs.append((c.tokenizer_source, ("tokenizer_source",)))
        refs.sort(key=lambda r: self.line(*r[1]) or 0)
        seen, out = set(), []
        for ref, path in refs:
            if ref not in seen:
                seen.add(ref)
                out.append((ref, path))
        return out

    def to_yaml(self, seed: Optional[int] = None, header: str = "") -> str:
        data = self.config.model_dump(exclude_none=True, mode="json")
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
        head = header
        if seed is not None:
            head += f"# seed: {seed}  (reproduce with: mergesmith run mergesmith_config.yml OUT_DIR --seed {seed})\n"
        return head + body


def parse_recipe(text: str, source: str = "<recipe>", strict: bool = False) -> Recipe:
    """Parse and validate a recipe's text. Raises MergeError naming the line on any problem."""
    data, lines, notes = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise MergeError(f"{where(source, 1)}: a recipe is a YAML mapping (keys like merge_method:, models:)")

    def loc(path: Path_) -> str:
        p = tuple(path)
        while p and p not in lines:
            p = p[:-1]
        return where(source, lines.get(p))

    # Unknown keys: warn (mergekit ignores them) or refuse under strict.
    def scrub(obj: Any, path: Path_) -> Any:
        if isinstance(obj, dict):
            known = _KNOWN.get(_pattern_of(path))
            out = {}
            for k, v in obj.items():
                if known is not None and k not in known:
                    msg = f"{loc(path + (k,))}: unknown key {short(k)}{did_you_mean(k, known)}; mergekit ignores it"
                    if strict:
                        raise MergeError(msg + " (refused under --strict)")
                    notes.append(msg + ", and so do we")
                    continue
                if k == "parameters":
                    out[k] = v  # parameter names are checked against the method later
                else:
                    out[k] = scrub(v, path + (k,))
            return out
        if isinstance(obj, list):
            return [scrub(v, path + (i,)) for i, v in enumerate(obj)]
        return obj

    clean = scrub(data, ())
    if "merge_method" not in clean:
        raise MergeError(f"{where(source, 1)}: the recipe has no 'merge_method:' (for example: merge_method: linear)")
    try:
        config = MergeConfiguration.model_validate(clean)
    except ValidationError as e:
        raise MergeError(_schema_error(e, clean, loc)) from None

    recipe = Recipe(config=config, source=source, text=text, lines=lines, warnings=notes)
    _check_structure(recipe, strict)
    for n in notes:
        warn(n)
    return recipe


def _is_tag(p: Any) -> bool:
    """pydantic's names of union members in an error location (`ConditionalParameter`, `list[...]`, `float`)."""
    return isinstance(p, str) and (p[:1].isupper() or "[" in p or p in ("bool", "float", "int", "str"))


def _schema_error(e: ValidationError, data: Any, loc) -> str:
    """The first schema error, on one line, at its recipe line."""
    err = e.errors()[0]
    raw = tuple(err["loc"])
    cut = next((i for i, p in enumerate(raw) if _is_tag(p)), len(raw))
    if "parameters" in raw[:cut] and cut < len(raw):  # a parameter's value fits no form of the union
        path = raw[:cut]
        if raw[cut] == "[key]":
            return f"{loc(path)}: parameter name {short(path[-1])} must be text (like weight or density)"
        got = data
        for p in path:
            got = got[p]
        return (
            f"{loc(path)}: parameter {short(path[-1], 40)} has a wrong value {short(got)}: give a number, "
            "true/false, a list of numbers (a gradient) or a list of {filter: ..., value: ...}"
        )
    path = tuple(p for p in raw if not _is_tag(p))
    key = short(".".join(str(p) for p in path) or "recipe", 80)[1:-1]
    if err["type"] == "missing":
        return f"{loc(path[:-1])}: '{key}' is required"
    got = err.get("input")
    got_s = short(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 60 else type(got).__name__
    return f"{loc(path)}: '{key}' has a wrong value {got_s}: {' '.join(str(err['msg']).split())}"


def _check_structure(r: Recipe, strict: bool) -> None:
    c = r.config
    given = [k for k in ("models", "slices", "modules") if getattr(c, k)]
    if len(given) != 1:
        raise MergeError(
            f"{r.at()}: a recipe needs exactly one of 'models:' or 'slices:' (or 'modules:') "
            f"({'neither' if not given else 'got ' + ' and '.join(given)})"
        )
    for name, m in (c.modules or {}).items():
        if bool(m.slices) == bool(m.models):
            raise MergeError(
                f"{r.at('modules', name)}: module {short(name)} needs exactly one of 'slices:' or "
                f"'models:' ({'got both' if m.slices else 'got neither'})"
            )
    for key in ("dtype", "out_dtype"):
        v = getattr(c, key)
        if v is not None:
            if v not in DTYPES:
                raise MergeError(
                    f"{r.at(key)}: {key} {short(v)} is not a dtype{did_you_mean(v, DTYPES)}; "
                    "use bfloat16, float16 or float32"
                )
    if c.tokenizer_source and c.tokenizer:
        raise MergeError(f"{r.at('tokenizer')}: give either 'tokenizer_source:' or 'tokenizer:', not both")
    pad = c.tokenizer.pad_to_multiple_of if c.tokenizer else None
    if pad is not None and not 1 <= pad <= MAX_PAD:
        raise MergeError(
            f"{r.at('tokenizer', 'pad_to_multiple_of')}: pad_to_multiple_of {short(pad)} must lie in "
            f"[1, {MAX_PAD}] (vocabularies are padded to multiples of 8 to 256)"
        )
    _check_names(r)
    _check_duplicates(r)
    for path, slices in r.slice_lists():
        _check_slices(r, path, slices)


def _check_slices(r: Recipe, path: Path_, slices: List[OutputSliceDefinition]) -> None:
    """Every source of a slice has as many layers as the others, in a range [start, end) with start < end."""
    for si, s in enumerate(slices):
        if not s.sources:
            raise MergeError(
                f"{r.at(*path, si)}: a slice needs at least one source (sources: [{{model: ..., "
                "layer_range: [start, end]}])"
            )
        lens = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lens) > 1:
            raise MergeError(f"{r.at(*path, si)}: every source of a slice needs the same number of layers")
        for j, src in enumerate(s.sources):
            a, b = src.layer_range
            if not (0 <= a < b):
                raise MergeError(
                    f"{r.at(*path, si, 'sources', j, 'layer_range')}: layer_range "
                    f"[{short(a, 24)}, {short(b, 24)}] must be [start, end) with 0 <= start < end"
                )


MAX_PAD = 1 << 16


def _check_names(r: Recipe) -> None:
    """Model references are paths or Hub ids: not empty, no control characters (they would garble every message
    that names the model, and no file is called that)."""
    c = r.config
    named = [(m.model, path + (i, "model")) for path, models in r.model_lists() for i, m in enumerate(models)]
    for path, slices in r.slice_lists():
        for si, s in enumerate(slices):
            named += [(src.model, path + (si, "sources", j, "model")) for j, src in enumerate(s.sources)]
            named += [(s.base_model, path + (si, "base_model"))] if s.base_model is not None else []
    named += [(c.base_model, ("base_model",))] if c.base_model is not None else []
    named += [(c.tokenizer_source, ("tokenizer_source",))] if c.tokenizer_source is not None else []
    for ref, path in named:
        if not ref.strip():
            raise MergeError(f"{r.at(*path)}: an empty model reference; give a folder path or a Hub id")
        if _BAD_IN_NAME.search(ref):
            raise MergeError(
                f"{r.at(*path)}: the model reference {short(ref)} holds a control character; "
                "give a folder path or a Hub id"
            )


def _check_duplicates(r: Recipe) -> None:
    """A model listed twice counts once, with its first entry's parameters (so in mergekit): refuse a repeat, but
    for a slice's other layers of the same model with the same parameters."""
    lists = [(path, [(m.model, None, m.parameters) for m in models]) for path, models in r.model_lists()]
    lists += [
        (path + (si, "sources"), [(src.model, tuple(src.layer_range), src.parameters) for src in s.sources])
        for path, slices in r.slice_lists()
        for si, s in enumerate(slices)
    ]
    for path, entries in lists:
        first: Dict[str, int] = {}
        for j, (model, layers, params) in enumerate(entries):
            k = first.setdefault(model, j)
            if k != j and (layers is None or layers == entries[k][1] or params != entries[k][2]):
                raise MergeError(
                    f"{r.at(*path, j, 'model')}: model {model} is listed twice (entries {k + 1} and "
                    f"{j + 1} of '{path[-1]}:', lines {r.line(*path, k, 'model')} and "
                    f"{r.line(*path, j, 'model')}); list each model once, with all of its parameters"
                )


def load_recipe(path: Union[str, Path], strict: bool = False) -> Recipe:
    """Read and parse the recipe file at `path` (parse_recipe), remembering the file and its folder."""
    p = Path(path)
    recipe = parse_recipe(read_recipe_text(p), source=p.name, strict=strict)
    recipe.path, recipe.folder = p.absolute(), p.resolve().parent
    return recipe


def read_recipe_text(p: Path) -> str:
    """The text of the recipe file `p`: a regular file of UTF-8 text, at most MAX_RECIPE_BYTES."""
    try:
        if p.exists() and not p.is_dir() and not p.is_file():  # a pipe or device would block or never end
            raise MergeError(f"recipe {p} is not a regular file; save the recipe to a file")
        if p.is_file() and p.stat().st_size > MAX_RECIPE_BYTES:
            raise MergeError(
                f"{p}: the recipe is {p.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} "
                "(mergekit recipes are a few KB)"
            )
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"recipe not found: {p}") from None
    except IsADirectoryError:
        raise MergeError(f"recipe is a folder, not a YAML file: {p}") from None
    except UnicodeDecodeError as e:
        raise MergeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MergeError(f"cannot read recipe {p}: {e.strerror}") from None
    return text


# --------------------------------------------------------------------------------------------------------------
# Files of several YAML documents (mergekit-multi's multi-stage recipes; run by mergesmith.stages)


@dataclass
class RecipeDocument:
    """One document of a YAML file: its text with the `name:` entry blanked out, padded so that its line numbers are
    the file's (parse_recipe's messages then name the file's lines), and that name."""

    text: str
    line: int  # the file line where the document starts
    name: Any = None  # the `name:` value as written (None when absent)
    name_line: Optional[int] = None


def split_documents(text: str, source: str) -> List[RecipeDocument]:
    """The non-empty documents of a YAML file, in file order; malformed YAML is a MergeError naming its line."""
    if len(text) > MAX_RECIPE_BYTES:
        raise MergeError(
            f"{source}: the recipe is {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES} "
            "(mergekit recipes are a few KB)"
        )
    loader = _Loader(text, source)
    docs: List[RecipeDocument] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None and not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
                docs.append(_document(text, node, loader, source))
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None
    finally:
        loader.dispose()
    return docs


def _document(text: str, node: yaml.Node, loader: _Loader, source: str) -> RecipeDocument:
    a, b = node.start_mark.index, node.end_mark.index
    body = list(text[a:b])
    name, name_line = None, None
    entries = node.value if isinstance(node, yaml.MappingNode) else []
    for i, (k, v) in enumerate(entries):
        if isinstance(k, yaml.ScalarNode) and k.value == "name":
            name, name_line = _scalar(loader, v, source), k.start_mark.line + 1
            # blank the entry and its separator (the next key's start, or the previous value's end): the document
            # parses as the recipe without it, block or flow style, on the same lines
            lo, hi = (
                (k.start_mark.index, entries[i + 1][0].start_mark.index)
                if i + 1 < len(entries)
                else (entries[i - 1][1].end_mark.index, v.end_mark.index)
                if i
                else (k.start_mark.index, b)
            )
            for j in range(lo - a, hi - a):
                if body[j] != "\n":
                    body[j] = " "
    pad = "\n" * node.start_mark.line + " " * node.start_mark.column
    return RecipeDocument(pad + "".join(body), node.start_mark.line + 1, name, name_line)


def normalize_dtype(name: Optional[str]) -> Optional[str]:
    return None if name is None else DTYPES[name]
