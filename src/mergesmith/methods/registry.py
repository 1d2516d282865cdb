"""The merge-method registry: a method is one decorated kernel whose signature declares its parameters.

    @merge_method("linear", pretty="Linear", url="https://arxiv.org/abs/2203.05482", base="ignored",
                  streaming=Streaming.ELEMENTWISE)
    def linear(inputs, *, weight: PerModel[float], normalize: bool = True):
        '''Weighted average of the models (model soups).

        Args:
            weight: this model's weight
            normalize: divide by the sum of weights
        '''

Argument names reserved for the tensors and their context: `base` (the base model's tensor, or None), `inputs`
(the other models' tensors, float32), `keys` (per input, its random stream key), `row_offset` (the first row of
this block in the whole tensor), `stat` (this block's share of a whole-tensor statistic, see `TwoPass`) and
`report` (a function taking a note about this tensor: a run gathers each note into one warning naming the tensors
it concerns, so a note should not itself vary from tensor to tensor). Every
other argument is a recipe parameter: annotated `PerModel[float]` (one value per input model, handed over as a
list) or plain `bool`/`int`/`float`/`str`/`Literal[...]` (one value for the merge). A default makes it optional;
a trailing underscore is not part of the recipe name (`lambda_` reads `lambda:`). The first paragraph of the
docstring describes the method; its `Args:` section (or `docs=`) describes each parameter.

Helpers given to the decorator (`check`, `copy_when`, `streaming` when a function, and a `TwoPass`'s `collect`
and `finish`) are called the same way: with the parameters and context they name.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from mergesmith.errors import warn

REQUIRED = object()
RESERVED = ("base", "inputs", "keys", "row_offset", "stat", "report")
BASE_POLICIES = ("required", "optional", "input", "ignored")

T = TypeVar("T")


class PerModel(Generic[T]):
    """Annotation marker: a parameter with one value per input model (weight, density, ...), given as a list."""


class Streaming(Enum):
    """How a method can take a large tensor."""

    ELEMENTWISE = "elementwise"  # each output element from the same element of the inputs: any split, same bytes
    ROWS = "rows"  # any split into blocks of rows gives the same bytes
    WHOLE = "whole"  # whole tensors only


@dataclass(frozen=True)
class Round:
    """One read of every row block in pass 1. `collect` gives a block's partial statistic (called like the
    kernel; `stat` is the previous round's result); `reduce(total, partial)` folds the partials in block order
    into the previous round's result (None in the first round); `finish` (called like the kernel with `stat`
    the folded total) makes the round's result."""

    collect: Callable[..., Any]
    reduce: Callable[[Any, Any], Any]
    finish: Optional[Callable[..., Any]] = None


@dataclass(frozen=True)
class TwoPass:
    """Row blocks that need a whole-tensor statistic: pass 1 runs `rounds` over the blocks, pass 2 calls the
    kernel for block k with `stat=share(statistic, k)` (once per block). `keeps_state`: the statistic holds
    per-element state between the passes (keep masks), so such tensors take turns (execute.keeps_state).
    `stored_inputs`: pass 1's rounds take bfloat16 CPU inputs as stored, and with `stored_merge` pass 2's kernel
    too (their compiled kernels widen them in cache; what those do not serve widens them first), so the executor
    does not convert those blocks to float32."""

    rounds: Tuple[Round, ...]
    share: Callable[[Any, int], Any]
    keeps_state: bool = False
    stored_inputs: bool = False
    stored_merge: bool = False


@dataclass(frozen=True)
class Range:
    """Closed interval of a numeric parameter (None: unbounded); `extrapolate`: --allow-extrapolation lifts it."""

    low: Optional[float] = None
    high: Optional[float] = None
    extrapolate: bool = False

    def problem(self, name: str, v: Any) -> Optional[str]:
        if v is None or ((self.low is None or v >= self.low) and (self.high is None or v <= self.high)):
            return None
        if self.extrapolate:
            return (
                f"{name} {v:g} lies outside {self.bounds()}, so the merge would extrapolate; pass "
                "--allow-extrapolation if that is meant"
            )
        if self.low is not None and self.high is not None:
            return f"{name} {v:g} must lie in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{name} {v:g} must be >= {self.low:g}"
        return f"{name} {v:g} must be <= {self.high:g}"

    def bounds(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"[{lo}, {hi}]"

    def __str__(self) -> str:
        return self.bounds() + (" (extrapolable)" if self.extrapolate else "")


# No weight, scale or lambda is meant beyond this: 1e300 only overflows the merge into Inf. Every number
# parameter lies within it, whatever its own range.
ABSURD = Range(-1e6, 1e6)


@dataclass(frozen=True)
class Param:
    name: str  # as written in recipes
    kind: type  # bool, int, float or str
    scope: str  # "shared", "input" (one per model) or "non_base" (one per model, not resolved for the base)
    default: Any = REQUIRED
    choices: Tuple[str, ...] = ()
    doc: str = ""
    range: Optional[Range] = None
    arg: str = ""  # the kernel's argument

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class Problem(NamedTuple):
    """A resolved value out of bounds: the parameter, the message, and which input (None: not one input's)."""

    param: str
    message: str
    index: Optional[int] = None


@functools.lru_cache(maxsize=None)
def _arg_names(fn: Callable) -> Tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


@dataclass(frozen=True)
class Method:
    name: str
    pretty: str
    url: str
    description: str
    params: Tuple[Param, ...]
    kernel: Callable[..., Any] = field(repr=False)
    # "required": the base is the kernel's `base`; "optional": the base when the recipe names one; "input": the
    # base model is one more input (karcher); "ignored": base_model plays no part (linear)
    base_policy: str = "required"
    # how many inputs besides the base (all inputs for the "input"/"ignored" policies) the method takes
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    randomized: bool = False
    streaming: Any = field(default=Streaming.WHOLE, repr=False)  # Streaming, TwoPass, or a function giving one
    check: Optional[Callable[..., Any]] = field(default=None, repr=False)  # -> (param, message[, input]) or None
    copy_when: Optional[Callable[..., bool]] = field(default=None, repr=False)  # true: the output is the input

    @property
    def uses_base(self) -> bool:
        """The base model, when the recipe names one, is passed as the kernel's `base` argument."""
        return self.base_policy in ("required", "optional")

    @property
    def builtin(self) -> bool:
        return self.kernel.__module__.startswith("mergesmith.")

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)

    @property
    def shared_params(self) -> List[Param]:
        return [p for p in self.params if p.scope == "shared"]

    @property
    def input_params(self) -> List[Param]:
        return [p for p in self.params if p.scope != "shared"]

    def defaults(self) -> Dict[str, Any]:
        """The shared parameters' defaults (None for required ones)."""
        return {p.name: None if p.required else p.default for p in self.shared_params}

    def call(self, fn: Callable, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]], **context):
        """fn with the parameters and context it names: shared values as they are, per-model ones as lists."""
        values = dict(context)
        for p in self.params:
            values[p.arg] = shared[p.name] if p.scope == "shared" else [d[p.name] for d in per_input]
        return fn(**{n: values[n] for n in _arg_names(fn) if n in values})

    def merge(
        self,
        base,
        inputs,
        shared,
        per_input,
        keys=None,
        row_offset: int = 0,
        stat: Any = None,
        report: Optional[Callable[[str], None]] = None,
    ):
        """The kernel on one tensor (or block of rows): base and inputs float32 (or bfloat16 as stored: see
        TwoPass.stored_merge), parameters as resolved; its notes go to `report` (default: a warning each)."""
        return self.call(
            self.kernel,
            shared,
            per_input,
            base=base,
            inputs=inputs,
            keys=keys if keys is not None else [0] * len(inputs),
            row_offset=row_offset,
            stat=stat,
            report=report or warn,
        )

    def streaming_for(self, shared: Mapping[str, Any]) -> Union[Streaming, TwoPass]:
        s = self.streaming
        return self.call(s, shared, []) if callable(s) else s

    def in_row_blocks(self, shared: Mapping[str, Any]) -> bool:
        return self.streaming_for(shared) is not Streaming.WHOLE

    def two_pass(self, shared: Mapping[str, Any]) -> Optional[TwoPass]:
        s = self.streaming_for(shared)
        return s if isinstance(s, TwoPass) else None

    def keeps_state(self, shared: Mapping[str, Any]) -> bool:
        s = self.two_pass(shared)
        return s is not None and s.keeps_state

    def copies(self, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> bool:
        """The output tensor is the single input's, unchanged: copied, not merged."""
        return self.copy_when is not None and bool(self.call(self.copy_when, shared, per_input))


METHODS: Dict[str, Method] = {}


def register(m: Method) -> Method:
    if m.name in METHODS:
        raise ValueError(
            f"merge method '{m.name}' is already defined by {METHODS[m.name].kernel.__module__}; choose another name"
        )
    METHODS[m.name] = m
    return m


def get_method(name: str) -> Method:
    from mergesmith.errors import MergeError, did_you_mean

    if name not in METHODS:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise MergeError(
            f"unknown merge_method {shown}{did_you_mean(name, METHODS)}; known: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def row_block_methods() -> List[str]:
    """Names of the methods that merge large tensors in row blocks with their default parameters."""
    return [m.name for m in METHODS.values() if m.in_row_blocks(m.defaults())]


def check_params(
    method: Method, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]], allow_extrapolation: bool = False
) -> Optional[Problem]:
    """The first resolved value outside its declared range (shared ones first, then each input's in order), else
    the method's own cross-input `check`; None when all is well."""

    def problem(p: Param, v: Any) -> Optional[str]:
        if p.kind not in (int, float) or not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        msg = None
        if p.range is not None and not (allow_extrapolation and p.range.extrapolate):
            msg = p.range.problem(p.name, v)
        return msg or ABSURD.problem(p.name, v)

    for p in method.shared_params:
        msg = problem(p, shared.get(p.name))
        if msg:
            return Problem(p.name, msg)
    for i, values in enumerate(per_input):
        for p in method.input_params:
            msg = problem(p, values.get(p.name))
            if msg:
                return Problem(p.name, msg, i)
    found = method.call(method.check, shared, per_input) if method.check else None
    return Problem(*found) if found else None


# ---------------------------------------------------------------------------------------------------------------
# reading a kernel's signature


def _parse_doc(doc: Optional[str]) -> Tuple[str, Dict[str, str]]:
    """(first paragraph, {argument: text}) of a docstring with an `Args:` section (`name: text`, continued on
    more deeply indented lines)."""
    text = inspect.cleandoc(doc or "")
    summary = " ".join(text.split("\n\n")[0].split())
    section = re.search(r"^Args:\n((?:[ \t]+\S.*\n?)+)", text, re.MULTILINE)
    lines = section.group(1).splitlines() if section else []
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
    args: Dict[str, str] = {}
    current = None
    for line in lines:
        m = re.match(r"(\w+):\s*(.*)$", line[indent:]) if not line[indent:].startswith(" ") else None
        if m:
            current = m.group(1)
            args[current] = m.group(2).strip()
        elif current is not None:
            args[current] += " " + line.strip()
    return summary, args


def _kind(hint: Any, where: str) -> Tuple[type, Tuple[str, ...], bool]:
    """(kind, choices, per model) of a parameter's annotation."""
    per_model = typing.get_origin(hint) is PerModel
    if per_model:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if all(isinstance(c, str) for c in choices):
            return str, tuple(choices), per_model
    if hint in (bool, int, float, str):
        return hint, (), per_model
    raise TypeError(f"{where}: type {hint!r} is not one of bool, int, float, str, Literal[...] or PerModel[...]")


def _range(r: Any) -> Optional[Range]:
    return r if r is None or isinstance(r, Range) else Range(*r)


def read_params(
    fn: Callable, name: str, base: str, ranges: Mapping[str, Any], docs: Mapping[str, str]
) -> Tuple[str, Tuple[Param, ...]]:
    """(description, parameters) of a kernel, from its signature, annotations and docstring."""
    hints = typing.get_type_hints(fn, include_extras=True)
    description, doc_args = _parse_doc(fn.__doc__)
    params = []
    for arg, sp in inspect.signature(fn).parameters.items():
        if arg in RESERVED:
            continue
        where = f"merge method '{name}', parameter '{arg}'"
        if arg not in hints:
            raise TypeError(f"{where}: needs a type annotation")
        kind, choices, per_model = _kind(hints[arg], where)
        pname = arg[:-1] if arg.endswith("_") else arg
        doc = docs.get(pname) or doc_args.get(arg) or doc_args.get(pname)
        if not doc:
            raise TypeError(f"{where}: needs a description (an 'Args:' line in the docstring, or docs=)")
        scope = "shared" if not per_model else ("non_base" if base in ("required", "optional") else "input")
        default = REQUIRED if sp.default is inspect.Parameter.empty else sp.default
        params.append(Param(pname, kind, scope, default, choices, doc, _range(ranges.get(pname)), arg))
    unknown = set(ranges) - {p.name for p in params}
    if unknown:
        raise TypeError(f"merge method '{name}': ranges for unknown parameters {sorted(unknown)}")
    if not description:
        raise TypeError(f"merge method '{name}': the kernel needs a docstring (its first paragraph describes it)")
    return description, tuple(params)


def merge_method(name: str, **options: Any) -> Callable[[Callable], Callable]:
    """Register the decorated kernel as merge method `name` (see the module's docstring); returns it unchanged.
    `options` are make_method's keywords (pretty and url required)."""

    def wrap(fn: Callable) -> Callable:
        register(make_method(fn, name, **options))
        fn.merge_method = name
        return fn

    return wrap


def make_method(
    fn: Callable,
    name: str,
    *,
    pretty: str,
    url: str,
    base: str = "required",
    inputs: Tuple[int, Optional[int]] = (1, None),
    randomized: bool = False,
    streaming: Any = Streaming.WHOLE,
    ranges: Optional[Mapping[str, Any]] = None,
    check: Optional[Callable[..., Any]] = None,
    copy_when: Optional[Callable[..., bool]] = None,
    docs: Optional[Mapping[str, str]] = None,
) -> Method:
    """The Method `merge_method` registers, without registering it.

    base: "required", "optional", "input" or "ignored" (see Method.base_policy). inputs: (least, most) inputs
    besides the base; None: no limit. randomized: the kernel takes `keys`. streaming: a Streaming, a TwoPass, or a
    function of the shared parameters giving one. ranges: {parameter: (low, high) or Range} checked on every
    resolved value before any work. check: a cross-input check (param, message[, input index]) or None.
    copy_when: true when the output is the single input's tensor unchanged (copied, not computed)."""
    if base not in BASE_POLICIES:
        raise TypeError(f"merge method '{name}': base must be one of {', '.join(BASE_POLICIES)}, got {base!r}")
    names = _arg_names(fn)
    if ("base" in names) != (base in ("required", "optional")):
        raise TypeError(f"merge method '{name}': a kernel takes `base` exactly when base is required or optional")
    if ("keys" in names) != randomized:
        raise TypeError(f"merge method '{name}': a kernel takes `keys` exactly when it is randomized")
    description, params = read_params(fn, name, base, ranges or {}, docs or {})
    return Method(
        name=name,
        pretty=pretty,
        url=url,
        description=description,
        params=params,
        kernel=fn,
        base_policy=base,
        min_inputs=inputs[0],
        max_inputs=inputs[1],
        randomized=randomized,
        streaming=streaming,
        check=check,
        copy_when=copy_when,
    )


# ---------------------------------------------------------------------------------------------------------------
# plugins

PLUGIN_GROUP = "mergesmith.methods"


def load_plugins() -> None:
    """Load the methods of installed packages: each entry point of the group `mergesmith.methods` names a module
    (importing it registers its methods) or a function (called once to register them). A plugin that fails, or
    tries to take a name already defined, is skipped with a warning."""
    from importlib.metadata import entry_points

    from mergesmith.errors import warn

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not hasattr(obj, "merge_method"):
                obj()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the built-in methods down with it
            warn(f"merge-method plugin '{ep.name}' ({ep.value}) not loaded: {type(e).__name__}: {e}")
