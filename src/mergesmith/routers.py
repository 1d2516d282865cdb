"""Router (gate) weights of a mixture of experts, and the model runs that compute them (docs/moe.md has the formulas).

The base model runs one decoder layer at a time, in float32: the layer's weights are read from the base's files into
transformers' own layer class (built on the meta device, so nothing is initialised), every prompt goes through it,
and the weights are dropped before the next layer is read. Memory follows one layer, one MLP (each MLP is read when
it is applied: StoredMLP) and the prompts' activations, never the whole model nor all the experts. Each layer's MLP
is taken out of the layer and applied by us: the layer then returns its attention output `h_mid`, we see the MLP's
input `x`, and the next layer's input is `h_mid + mlp(x)`, where `mlp` is the base's MLP (mergekit's `hidden` gates)
or the mixture of experts with the routers fitted so far (`--calibrate` and the routing report). This holds for the
pre-norm decoder layers of the families an MoE is built from (Llama, Mistral, Qwen2, Qwen3): `h + attn(norm(h))`,
then `+ mlp(norm(.))`.

Sequences are right-padded into batches: with a causal mask a real token never sees the padding after it, so each
token's states are those of its sequence run alone.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mergesmith.errors import MergeError

BATCH_TOKENS = 4096  # padded tokens per batch: bounds the activations held per layer call
BATCH_SEQS = 32


SMALL_HIDDEN = 1024  # models this narrow run their router prompts on one thread (one_thread)


@contextmanager
def one_thread(small: bool) -> Iterator[None]:
    """torch on one thread while `small`: operations this small cost more in hand-offs between threads than they
    save (the tiny family's calibration: 12 s on one thread, 26 s on two, on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ token batches


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) token ids, right-padded
    lengths: List[int]
    rows: List[int]  # the index of each sequence in the caller's list

    @property
    def valid(self) -> torch.Tensor:
        """(B, T) True at real tokens."""
        t = torch.arange(self.ids.shape[1])
        return t[None, :] < torch.tensor(self.lengths)[:, None]


def make_batches(seqs: Sequence[Sequence[int]], pad: int = 0) -> List[Batch]:
    """Sequences grouped by length (less padding), at most BATCH_SEQS and about BATCH_TOKENS padded tokens each."""
    order = sorted(range(len(seqs)), key=lambda k: (len(seqs[k]), k))
    batches: List[Batch] = []
    group: List[int] = []

    def close() -> None:
        if group:
            n = max(len(seqs[k]) for k in group)
            ids = torch.full((len(group), n), pad, dtype=torch.long)
            for r, k in enumerate(group):
                ids[r, : len(seqs[k])] = torch.tensor(list(seqs[k]), dtype=torch.long)
            batches.append(Batch(ids, [len(seqs[k]) for k in group], list(group)))
            group.clear()

    for k in order:
        if group and (len(group) >= BATCH_SEQS or (len(group) + 1) * len(seqs[k]) > BATCH_TOKENS):
            close()
        group.append(k)
    close()
    return batches


def encode(tok, item, what: str = "a prompt") -> Tuple[List[int], List[int]]:
    """(token ids, the positions that belong to the expert) of a prompt. Text: mergekit's tokenization, every
    position. A chat exchange (an object with .prompt and .answer): the user turn in the tokenizer's chat template
    (as `mergesmith eval` asks), then the answer and the end-of-turn token; the positions that predict the answer's
    tokens and the end of turn (the last of the prompt and each of the answer's)."""
    from mergesmith.evaluate import _prompt_ids

    if isinstance(item, str):
        ids = tok((tok.bos_token or "") + item, add_special_tokens=False)["input_ids"]
        if not ids:
            raise MergeError(f"{what} is empty after tokenization; give it some text")
        return ids, list(range(len(ids)))
    head = _prompt_ids(tok, item.prompt)
    answer = tok(item.answer, add_special_tokens=False)["input_ids"]
    if not head or not answer:
        raise MergeError(f"{what}: its prompt or answer is empty after tokenization; give both some text")
    ids = head + answer + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    return ids, list(range(len(head) - 1, len(ids) - 1))


# ------------------------------------------------------------------------------------------------ the layer stack


class _Zero(torch.nn.Module):
    """Stands in for a layer's MLP: keeps its input, returns zeros (the layer then returns its attention output)."""

    def __init__(self):
        super().__init__()
        self.seen: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return torch.zeros_like(x)


def _activation(name: str):
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise MergeError(f"hidden_act {name!r} of the base model is not an activation transformers knows")
    return ACT2FN[name]


@dataclass
class DenseMLP:
    """gate/up/down weights (stored dtype, upcast at use): down(act(gate x) * up x)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: Callable

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = x @ self.gate.float().T, x @ self.up.float().T
        return (self.act(g) * u) @ self.down.float().T


class Stack:
    """A model's decoder layers, materialised one at a time in float32 on `device` from its weight files."""

    def __init__(self, idx, device: torch.device):
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        cfg = dict(idx.config or {})
        mt = cfg.pop("model_type", None)
        cfg.pop("auto_map", None)  # the built-in class of the model type, never the model's own code
        config = CONFIG_MAPPING[mt].from_dict(cfg)
        config._attn_implementation = "eager"  # takes the float mask made here, like sdpa; no kernel differences
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        self.config, self.idx, self.device = config, idx, device
        self.rotary = type(self.skeleton.model.rotary_emb)(config=config).to(device)
        self.act = _activation(getattr(config, "hidden_act", "silu"))
        self.num_layers = len(self.skeleton.model.layers)

    def read(self, name: str) -> torch.Tensor:
        return self.idx.read(name).to(self.device)

    def embed(self, batches: Sequence[Batch]) -> List[torch.Tensor]:
        table = self.idx.read("model.embed_tokens.weight")
        return [table[b.ids].to(device=self.device, dtype=torch.float32) for b in batches]

    def _window(self, i: int) -> Optional[int]:
        """The sliding window of layer i's attention (None: it sees the whole sequence)."""
        w = getattr(self.config, "sliding_window", None)
        kinds = getattr(self.config, "layer_types", None)
        if kinds:
            return w if kinds[i] == "sliding_attention" else None
        return w if self.config.model_type == "mistral" else None

    def mask(self, t: int, window: Optional[int]) -> torch.Tensor:
        """(1, 1, T, T) additive causal mask (0 where a token may attend, the float minimum elsewhere)."""
        q = torch.arange(t, device=self.device)[:, None]
        k = torch.arange(t, device=self.device)[None, :]
        allowed = (k <= q) & ((q - k < window) if window else True)
        m = torch.zeros(t, t, device=self.device)
        return m.masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    def layer(self, i: int) -> torch.nn.Module:
        """Layer i without its MLP (a _Zero in its place), its other weights read from the model in float32."""
        layer = copy.deepcopy(self.skeleton.model.layers[i])
        layer.mlp = _Zero()
        prefix = f"model.layers.{i}."
        state = {}
        for k in layer.state_dict():
            if prefix + k not in self.idx.tensors:
                raise MergeError(
                    f"model {self.idx.ref}: tensor {prefix + k} is missing (needed to run the model "
                    "for the router prompts)"
                )
            state[k] = self.read(prefix + k).float()
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def mlp(self, idx, i: int) -> DenseMLP:
        """Layer i's MLP of the model `idx` (the base or an expert)."""
        p = f"model.layers.{i}.mlp."
        return DenseMLP(
            *(idx.read(p + n + "_proj.weight").to(self.device) for n in ("gate", "up", "down")), act=self.act
        )

    def stored_mlp(self, idx, i: int) -> "StoredMLP":
        """Layer i's MLP of the model `idx`, read when applied (StoredMLP)."""
        return StoredMLP(self, idx, i)

    @torch.no_grad()
    def attention(self, layer: torch.nn.Module, i: int, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_mid, x): the layer's output without its MLP, and the MLP's input."""
        b, t, _ = h.shape
        pos = torch.arange(t, device=self.device)[None].expand(b, t)
        pe = self.rotary(h, pos)
        out = layer(h, attention_mask=self.mask(t, self._window(i)), position_ids=pos, position_embeddings=pe)
        out = out[0] if isinstance(out, tuple) else out
        return out, layer.mlp.seen


@dataclass
class StoredMLP:
    """A model's MLP of one layer, read from its files when applied and dropped after: a mixture then holds one
    expert's weights at a time, whatever the number of experts (walk applies each layer's MLP once, so nothing is
    read twice)."""

    stack: Stack
    idx: object
    layer: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.mlp(self.idx, self.layer)(x)


Visit = Callable[[int, List[torch.Tensor], List[torch.Tensor]], Optional[Callable]]


@torch.no_grad()
def walk(stack: Stack, batches: Sequence[Batch], visit: Visit, layers: Optional[int] = None) -> None:
    """Run the batches through the layers. For layer i, `visit(i, inputs, mlp_inputs)` (lists per batch) returns
    the MLP to apply there (None: stop)."""
    h = stack.embed(batches)
    for i in range(layers if layers is not None else stack.num_layers):
        layer = stack.layer(i)
        mids, xs = zip(*(stack.attention(layer, i, hb) for hb in h))
        del layer
        mlp = visit(i, h, list(xs))
        if mlp is None:
            return
        # every batch's tokens through the MLP at once: each expert's weights are upcast once per layer
        out = mlp(torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]))
        h = [m + o.view_as(m) for m, o in zip(mids, out.split([x.shape[0] * x.shape[1] for x in xs]))]


# ------------------------------------------------------------------------------------------------ the mixture


@dataclass
class Mixture:
    """One layer's mixture of experts as the output model computes it: softmax over the router's logits, the
    top k, their weights renormalised to sum to 1 (Mixtral; Qwen MoE with norm_topk_prob), plus a shared expert
    scaled by sigmoid(shared gate . x) when there is one."""

    router: torch.Tensor  # (E, H) float32
    experts: List[Callable[[torch.Tensor], torch.Tensor]]  # DenseMLP or StoredMLP
    k: int
    shared: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    shared_gate: Optional[torch.Tensor] = None  # (1, H)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(flat @ self.router.T, dim=-1)
        top, which = torch.topk(probs, self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, mlp in enumerate(self.experts):
            w = (top * (which == e)).sum(-1)
            rows = torch.nonzero(w > 0).flatten()
            if rows.numel():
                out[rows] += w[rows, None] * mlp(flat[rows])
        if self.shared is not None:
            out += torch.sigmoid(flat @ self.shared_gate.T) * self.shared(flat)
        return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------------ mergekit's gates


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(layers: int, n: int, hidden: int, seed: int, uniform: bool) -> torch.Tensor:
    """(layers, n, hidden): `random` draws N(0, 1); `uniform_random` U(-1/sqrt(hidden), 1/sqrt(hidden)), the
    default initialisation of a torch Linear (mergekit's formulas, drawn from torch's generator seeded `seed`)."""
    g = torch.Generator().manual_seed(seed)
    if not uniform:
        return torch.randn((layers, n, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, n, hidden), generator=g) * 2 * scale - scale


@dataclass
class PromptSets:
    """The distinct prompts of every gated expert (token ids and counted positions: encode), and which belong to
    whom."""

    seqs: List[List[int]] = field(default_factory=list)
    positions: List[List[int]] = field(default_factory=list)
    positive: List[List[int]] = field(default_factory=list)  # per expert: indexes into seqs
    negative: List[List[int]] = field(default_factory=list)

    @classmethod
    def of(cls, tok, experts: Sequence) -> "PromptSets":
        ps, where = cls(), {}

        def add(items) -> List[int]:
            out = []
            for item in items:
                key = item if isinstance(item, str) else ("chat", item.prompt, item.answer)
                if key not in where:
                    where[key] = len(ps.seqs)
                    ids, at = encode(tok, item)
                    ps.seqs.append(ids)
                    ps.positions.append(at)
                out.append(where[key])
            return out

        for e in experts:
            ps.positive.append(add(e.positive_prompts or []))
            ps.negative.append(add(e.negative_prompts or []))
        return ps


def cheap_embed_gates(table: torch.Tensor, sets: PromptSets, layers: int) -> torch.Tensor:
    """(layers, n, hidden): per expert, the sum of the token embeddings of its positive prompts (every token of a
    text prompt, BOS included), made unit length; minus the same of its negative prompts; made unit length again;
    the same vector for every layer."""

    def summed(which: List[int]) -> torch.Tensor:
        ids = torch.tensor([sets.seqs[k][j] for k in which for j in sets.positions[k]], dtype=torch.long)
        return _unit(table[ids].float().sum(0))

    vecs = []
    for pos, neg in zip(sets.positive, sets.negative):
        v = summed(pos)
        if neg:
            v = v - summed(neg)
        vecs.append(_unit(v))
    return torch.stack(vecs)[None].expand(layers, -1, -1).clone()


def _prompt_state(
    states: List[torch.Tensor], batches: Sequence[Batch], sets: PromptSets, average: bool
) -> torch.Tensor:
    """(prompts, hidden): per prompt, the state at its last counted position, or the mean over its counted
    positions when `average` (a text prompt counts every token)."""
    out = torch.empty(len(sets.seqs), states[0].shape[-1], dtype=torch.float64)
    for s, b in zip(states, batches):
        for r, k in enumerate(b.rows):
            at = sets.positions[k]
            out[k] = (s[r, at].double().mean(0) if average else s[r, at[-1]].double()).cpu()
    return out


def hidden_gates(stack: Stack, sets: PromptSets, average: bool) -> torch.Tensor:
    """(layers, n, hidden), mergekit's `hidden` gates: for layer i, the hidden state entering layer i (the
    residual stream, before the layer's input norm), of each prompt's last token (`hidden`, `hidden_last`) or
    averaged over its tokens (`hidden_avg`), averaged over the expert's positive prompts, minus the same of its
    negative prompts, made unit length. The base runs in float32 with its own MLPs. (A chat prompt's tokens are
    its counted positions: encode.)"""
    batches = make_batches(sets.seqs)
    per_layer: List[torch.Tensor] = []

    def visit(i, inputs, _xs):
        states = _prompt_state(inputs, batches, sets, average)
        vecs = []
        for pos, neg in zip(sets.positive, sets.negative):
            v = states[pos].mean(0)
            if neg:
                v = v - states[neg].mean(0)
            vecs.append(_unit(v))
        per_layer.append(torch.stack(vecs))
        return stack.stored_mlp(stack.idx, i)

    walk(stack, batches, visit)
    return torch.stack(per_layer).float()


# ------------------------------------------------------------------------------------------------ calibration

CALIBRATION_STEPS = 200
CALIBRATION_L2 = 1e-4
SMALL_FIT = 1 << 24  # tokens x hidden x experts below which the fit runs on one thread


def fit_router(
    x: torch.Tensor, y: torch.Tensor, n: int, steps: Optional[int] = None, l2: Optional[float] = None
) -> torch.Tensor:
    """(n, hidden) float64: multinomial logistic regression without bias (a router has none) of the labels `y`
    on the rows of `x`, each expert's tokens weighted equally in total, with an L2 penalty `l2`/2 |W|^2; fitted
    by L-BFGS in float64 from zero (the loss is convex: the result does not depend on a starting point)."""
    steps = CALIBRATION_STEPS if steps is None else steps
    l2 = CALIBRATION_L2 if l2 is None else l2
    x64, y = x.double().cpu(), y.cpu()
    counts = torch.bincount(y, minlength=n).double()
    weight = ((1.0 / counts.clamp(min=1))[y] / (counts > 0).sum())[:, None]
    target = torch.nn.functional.one_hot(y, n).double() * weight  # each row: its label, weighted
    w = torch.zeros(n, x64.shape[1], dtype=torch.float64)
    opt = torch.optim.LBFGS(
        [w],
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def loss_fn():  # the loss and its gradient, (softmax - one-hot)^T x, without autograd
        logp = torch.log_softmax(x64 @ w.T, dim=-1)
        loss = -(target * logp).sum() + 0.5 * l2 * (w * w).sum()
        w.grad = (logp.exp() * weight - target).T @ x64 + l2 * w
        return loss

    with one_thread(x64.numel() * n < SMALL_FIT):
        opt.step(loss_fn)
    return w


def _tokens(
    xs: List[torch.Tensor],
    batches: Sequence[Batch],
    labels: Sequence[int],
    positions: Optional[Sequence[Sequence[int]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows of the batches' states at the counted positions of each sequence (all of its tokens by default),
    with each sequence's label."""
    rows, ys = [], []
    for s, b in zip(xs, batches):
        for r, (k, length) in enumerate(zip(b.rows, b.lengths)):
            at = list(positions[k]) if positions is not None else list(range(length))
            rows.append(s[r, at])
            ys += [labels[k]] * len(at)
    return torch.cat(rows), torch.tensor(ys, dtype=torch.long)


@dataclass
class MoELayers:
    """What the mixture at each layer is made of: the expert models (indexes), the shared expert model, its gate
    vectors, the number of experts per token, and the dtype the output stores routers in (the calibration and the
    report use the rounded routers, as the output will)."""

    experts: List  # ModelIndex per expert
    k: int
    out_dtype: torch.dtype
    shared: Optional[object] = None
    shared_gates: Optional[torch.Tensor] = None  # (layers, 1, hidden)

    def mixture(self, stack: Stack, i: int, router: torch.Tensor) -> Mixture:
        """Layer i's mixture; its MLPs are read as they are applied, one at a time (StoredMLP)."""
        rounded = router.to(self.out_dtype).float().to(stack.device)
        shared = stack.stored_mlp(self.shared, i) if self.shared is not None else None
        g = self.shared_gates[i].to(self.out_dtype).float().to(stack.device) if self.shared_gates is not None else None
        return Mixture(rounded, [stack.stored_mlp(e, i) for e in self.experts], self.k, shared, g)


def calibrated_gates(
    stack: Stack, moe: MoELayers, seqs: List[List[int]], labels: List[int], positions: Optional[List[List[int]]] = None
) -> torch.Tensor:
    """(layers, n, hidden): each layer's router fitted (fit_router) on the MLP inputs of the labelled sequences'
    tokens (those at `positions`, all by default) at that layer, as the mixture itself computes them: layers below
    use the routers already fitted, so each router learns the states it will see in the output model."""
    batches = make_batches(seqs)
    fitted: List[torch.Tensor] = []

    def visit(i, _inputs, xs):
        x, y = _tokens(xs, batches, labels, positions)
        fitted.append(fit_router(x, y, len(moe.experts)).float())
        return moe.mixture(stack, i, fitted[-1])

    walk(stack, batches, visit)
    return torch.stack(fitted)


# ------------------------------------------------------------------------------------------------ routing report


def routing_report(
    stack: Stack,
    moe: MoELayers,
    routers: torch.Tensor,
    seqs: List[List[int]],
    labels: List[int],
    positions: List[List[int]],
) -> Dict[str, object]:
    """Per expert and layer, the share of its report tokens whose top-1 expert (the largest router logit, as the
    output model routes) is that expert, running the mixture as the output model does."""
    batches = make_batches(seqs)
    n = len(moe.experts)
    hits = torch.zeros(stack.num_layers, n, dtype=torch.long)
    total = torch.bincount(
        torch.tensor([labels[k] for k in range(len(seqs)) for _ in positions[k]], dtype=torch.long), minlength=n
    )

    def visit(i, _inputs, xs):
        mix = moe.mixture(stack, i, routers[i])
        x, y = _tokens(xs, batches, labels, positions)
        top1 = (x @ mix.router.T).argmax(-1).cpu()
        hits[i] = torch.bincount(y[top1 == y], minlength=n)
        return mix

    walk(stack, batches, visit)
    share = hits.double() / total.clamp(min=1).double()
    return {
        "tokens": total.tolist(),
        "by_layer": share.T.tolist(),
        "overall": (hits.sum(0).double() / (total.clamp(min=1) * stack.num_layers)).tolist(),
    }
