"""Evaluating models: exact match (greedy generation through the chat template), answer-token accuracy
(teacher-forced) and perplexity, per skill, for one or more model folders.

- exact match: the greedy continuation of the chat prompt, up to the end-of-turn token, equals the answer
  (surrounding whitespace ignored);
- answer-token accuracy: with the prompt and the answer so far given, the fraction of the answer's tokens, and the
  end-of-turn token after them, that are the model's most likely next token;
- perplexity: exp(mean next-token negative log-likelihood) over a text, in windows of the model's context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergesmith.errors import MergeError


@dataclass(frozen=True)
class Task:
    skill: str
    prompt: str
    answer: str


def builtin_tasks() -> List[Task]:
    from mergesmith.skills import SKILLS, eval_set

    return [Task(s, p, a) for s in SKILLS for p, a in eval_set(s)]


def load_tasks(path: Path) -> List[Task]:
    """`{"prompt": ..., "answer": ..., "skill": optional}` per line."""
    tasks = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MergeError(f"cannot read tasks file {path}: {e.strerror}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            tasks.append(Task(str(d.get("skill", "custom")), str(d["prompt"]), str(d["answer"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MergeError(f'{path}:{i}: expected a JSON object with "prompt" and "answer"') from None
    if not tasks:
        raise MergeError(f"{path}: no tasks")
    return tasks


def load(path: Path):
    """A model folder's model and tokenizer, through transformers' built-in classes only: a folder that asks for its
    own code (`auto_map`) is refused before transformers sees it, so it can neither run it nor ask whether to."""
    from mergesmith.io.index import refuse_custom_code

    refuse_custom_code(path, "eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot load model {path}: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    return model, tok


def _prompt_ids(tok, prompt: str) -> List[int]:
    if tok.chat_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = prompt + "\n"
    return tok(text, add_special_tokens=False)["input_ids"]


def _end_id(tok) -> Optional[int]:
    return tok.eos_token_id


@dataclass(frozen=True)
class Encoded:
    """A task in token ids: the chat prompt, and the answer followed by the end-of-turn token (when there is one)."""

    skill: str
    answer: str
    prompt: Tuple[int, ...]
    target: Tuple[int, ...]


def encode(tok, tasks: Sequence[Task]) -> List[Encoded]:
    """The tasks in token ids, once: a search scores the same prompts for every candidate."""
    end = _end_id(tok)
    return [
        Encoded(
            t.skill,
            t.answer,
            tuple(_prompt_ids(tok, t.prompt)),
            tuple(tok(t.answer, add_special_tokens=False)["input_ids"]) + ((end,) if end is not None else ()),
        )
        for t in tasks
    ]


def _mean_by_skill(marks: Dict[str, List[int]]) -> Dict[str, float]:
    return {s: sum(v) / len(v) for s, v in marks.items()}


@torch.no_grad()
def greedy(model, prompts: Sequence[Sequence[int]], max_new: int, pad: int, end: Optional[int]) -> List[List[int]]:
    """Greedy continuations of left-padded prompts with a KV cache, each cut before `end`: one forward pass for the
    prompts, then one token per step for every row, until every row has ended or `max_new` tokens."""
    n = max(map(len, prompts))
    ids = torch.tensor([[pad] * (n - len(p)) + list(p) for p in prompts])
    att = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    pos = (att.cumsum(-1) - 1).clamp_(min=0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    steps: List[torch.Tensor] = []
    for _ in range(max_new):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        steps.append(nxt)
        if end is not None:
            done |= nxt == end
        if bool(done.all()) or len(steps) == max_new:
            break
        att = torch.cat([att, torch.ones(len(prompts), 1, dtype=att.dtype)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=pos, use_cache=True, **_cache_of(out))
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    return [r[: r.index(end)] if end is not None and end in r else r for r in rows]


def _cache_of(out) -> Dict[str, object]:
    """The KV cache a forward pass returned, as the next call takes it (transformers renamed past_key_values to
    cache)."""
    cache = getattr(out, "cache", None)
    return {"cache": cache} if cache is not None else {"past_key_values": out.past_key_values}


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (_end_id(tok) or 0)


def exact_match_encoded(model, tok, tasks: Sequence[Encoded], batch: int = 64) -> Dict[str, float]:
    """exact_match on encoded tasks."""
    hits: Dict[str, List[int]] = {}
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        longest = max(len(t.target) for t in chunk) - (_end_id(tok) is not None)
        rows = greedy(model, [t.prompt for t in chunk], longest + 4, _pad_id(tok), _end_id(tok))
        for t, row in zip(chunk, rows):
            text = tok.decode(row, skip_special_tokens=True)
            hits.setdefault(t.skill, []).append(int(text.strip() == t.answer.strip()))
    return _mean_by_skill(hits)


def exact_match(model, tok, tasks: Sequence[Task], batch: int = 64) -> Dict[str, float]:
    return exact_match_encoded(model, tok, encode(tok, tasks), batch)


@torch.no_grad()
def teacher_forced(model, tok, tasks: Sequence[Encoded], batch: int = 64) -> Dict[str, Dict[str, float]]:
    """{skill: {"token_accuracy", "perplexity"}} over the answer tokens (and end-of-turn), given the prompt and the
    answer so far: one forward pass per batch, compared in one go."""
    right: Dict[str, List[int]] = {}
    nll: Dict[str, List[float]] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        rows = [t.prompt + t.target for t in chunk]
        n = max(map(len, rows))
        ids = torch.tensor([list(r) + [pad] * (n - len(r)) for r in rows])
        att = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        # the prediction for position j comes from position j - 1; only answer positions count
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        hit = (logits.argmax(-1) == ids[:, 1:]).tolist()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].tolist()
        for t, h, p in zip(chunk, hit, lp):
            a, b = len(t.prompt) - 1, len(t.prompt) - 1 + len(t.target)
            right.setdefault(t.skill, []).extend(int(x) for x in h[a:b])
            nll.setdefault(t.skill, []).extend(-x for x in p[a:b])
    return {
        s: {"token_accuracy": sum(v) / len(v), "perplexity": math.exp(sum(nll[s]) / len(nll[s]))}
        for s, v in right.items()
    }


def token_accuracy_encoded(model, tok, tasks: Sequence[Encoded], batch: int = 64) -> Dict[str, float]:
    """token_accuracy on encoded tasks."""
    return {s: v["token_accuracy"] for s, v in teacher_forced(model, tok, tasks, batch).items()}


def token_accuracy(model, tok, tasks: Sequence[Task], batch: int = 64) -> Dict[str, float]:
    return token_accuracy_encoded(model, tok, encode(tok, tasks), batch)


@torch.no_grad()
def perplexity(model, tok, text: str, window: Optional[int] = None) -> float:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise MergeError("perplexity needs a text of at least two tokens")
    window = window or min(getattr(model.config, "max_position_embeddings", 512) or 512, 512)
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[s : s + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, chunk[:, 1:, None])
        nll -= lp.sum().item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def evaluate(
    paths: Sequence[Path],
    names: Optional[Sequence[str]] = None,
    tasks: Optional[List[Task]] = None,
    text: Optional[str] = None,
) -> List[dict]:
    from mergesmith.io.index import refuse_custom_code
    from mergesmith.skills import heldout_text

    for path in paths:  # all of them before the first evaluation
        refuse_custom_code(Path(path), "eval")
    tasks = builtin_tasks() if tasks is None else tasks
    text = heldout_text() if text is None else text
    results = []
    for i, path in enumerate(paths):
        model, tok = load(Path(path))
        results.append(
            {
                "name": names[i] if names else Path(path).name,
                "path": str(path),
                "accuracy": exact_match(model, tok, tasks),
                "token_accuracy": token_accuracy(model, tok, tasks),
                "perplexity": perplexity(model, tok, text),
            }
        )
    return results


def recovered(result: dict, base: dict, experts: Dict[str, dict], key: str = "token_accuracy") -> Optional[float]:
    """Mean over skills of (merged - base) / (expert - base): the share of each expert's gain the merge kept."""
    shares = []
    for skill, expert in experts.items():
        gap = expert[key].get(skill, 0) - base[key].get(skill, 0)
        if gap > 0:
            shares.append((result[key].get(skill, 0) - base[key].get(skill, 0)) / gap)
    return sum(shares) / len(shares) if shares else None


def format_table(results: List[dict], extra: Optional[Dict[str, Dict[str, str]]] = None) -> str:
    skills = list(dict.fromkeys(s for r in results for s in r["accuracy"]))
    extra = extra or {}
    extra_cols = list(dict.fromkeys(c for v in extra.values() for c in v))
    head1 = f"{'':16s} {'exact match':^{8 * len(skills)}s} | {'answer-token accuracy':^{8 * len(skills)}s} |"
    head2 = (
        f"{'model':16s} "
        + "".join(f"{s[:7]:>8s}" for s in skills)
        + " | "
        + "".join(f"{s[:7]:>8s}" for s in skills)
        + " | "
        + f"{'ppl':>7s}"
        + "".join(f" {c:>10s}" for c in extra_cols)
    )
    lines = [head1, head2, "-" * len(head2)]
    for r in results:
        row = (
            f"{r['name'][:16]:16s} "
            + "".join(f"{r['accuracy'].get(s, 0):8.2f}" for s in skills)
            + " | "
            + "".join(f"{r['token_accuracy'].get(s, 0):8.2f}" for s in skills)
            + " | "
            + f"{r['perplexity']:7.2f}"
        )
        row += "".join(f" {extra.get(r['name'], {}).get(c, ''):>10s}" for c in extra_cols)
        lines.append(row)
    return "\n".join(lines)
