"""The Executor: the only part with threads and I/O.

Walks the plan in output-file order, reads each tensor's inputs (whole or in row blocks, with preadv:
mergesmith.io.index), upcasts to float32 (bfloat16 row blocks of DARE/DELLA and of the TIES family's statistics
stay as stored: their kernels widen them in cache), calls the method's kernel, rounds once to the output dtype and
writes the bytes straight to their place in the output shard. A bounded number of tensors and blocks is in flight,
so memory follows the largest tensor, not the model. Work happens in `OUT_DIR.partial/`, renamed to OUT_DIR only when
everything is written and checked (mergesmith.outdir).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mergesmith.device import pick_device
from mergesmith.errors import MergeError, log, warn
from mergesmith.io.writer import ShardWriter, write_index
from mergesmith.methods import TwoPass, compiled
from mergesmith.plan import Plan, TensorTask, row_blocks


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x. A finite sum proves it (NaN and Inf propagate); only an overflowing sum needs the
    elementwise check, so the common case costs one fast reduction instead of a boolean pass."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _check_input(plan: Plan, ref, x: torch.Tensor) -> bool:
    """NaN or Inf in an input: a warning, or under --strict an error. Returns whether x is finite."""
    if all_finite(x):
        return True
    msg = f"model {ref.model}: tensor {ref.name} holds NaN or Inf values"
    if plan.strict:
        raise MergeError(msg + " (refused under --strict)")
    warn(msg)
    return False


def _load(
    plan: Plan, ref, device: torch.device, rows: Optional[Tuple[int, int]], check: bool = True, stored: bool = False
) -> torch.Tensor:
    """One input's block in float32 on the device, or with `stored` bfloat16 on the CPU left as it is."""
    raw = plan.models[ref.model].read(ref.name, rows=rows, take=ref.take)
    if stored and device.type == "cpu" and raw.dtype == torch.bfloat16 and compiled.available():
        if check and compiled.nonfinite(raw):  # only the first read is checked, as below
            _check_input(plan, ref, raw.float())
        return raw
    widened = compiled.widen(raw) if device.type == "cpu" else None  # bfloat16: converted and checked in one pass
    x, finite = widened if widened is not None else (raw.to(device=device, dtype=torch.float32), False)
    if check and not finite:
        _check_input(plan, ref, x)
    return x


def _narrowed(task: TensorTask, x: torch.Tensor, what: str) -> torch.Tensor:
    """x (finite) in the task's output dtype; float16 tops out at 65504, and a value beyond it would become Inf."""
    out = x.to(dtype=task.out_dtype)
    if task.out_dtype == torch.float16 and x.dtype != torch.float16 and not all_finite(out):
        raise MergeError(f"{what} holds values beyond float16's range (65504); use out_dtype bfloat16 or float32")
    return out


def _output(task: TensorTask, out: torch.Tensor) -> torch.Tensor:
    """A merged block in the task's output dtype, on the CPU; NaN or Inf in the float32 result refused (a finite
    value beyond bfloat16's range rounds to Inf, as torch converts it). Float32 to bfloat16 on the CPU: converted
    and checked in one compiled pass."""
    narrowed = compiled.narrow(out) if task.out_dtype == torch.bfloat16 else None
    if narrowed is not None and narrowed[1]:
        return narrowed[0]
    if narrowed is None and all_finite(out):
        return _narrowed(task, out, f"tensor {task.name}: the merge").cpu()
    raise MergeError(f"tensor {task.name}: the merge produced NaN or Inf (check the weights and inputs of this tensor)")


def _copy(plan: Plan, task: TensorTask, rows: Optional[Tuple[int, int]], warned: bool) -> Tuple[torch.Tensor, bool]:
    """A tensor (or rows [a, b) of it) taken as it is (passthrough, non-float, only one model has it), checked like
    a merge's inputs; NaN or Inf warns once per tensor (`warned`: an earlier block did). Returns (values, warned)."""
    ref = task.inputs[0]
    t = plan.models[ref.model].read(ref.name, rows=rows)
    if not t.dtype.is_floating_point:
        return t, warned
    if all_finite(t):
        return _narrowed(task, t, f"model {ref.model}: tensor {ref.name}"), warned
    if not warned:
        _check_input(plan, ref, t)  # a warning, or under --strict an error
    return t.to(task.out_dtype), True


def _permute(plan: Plan, task: TensorTask, base, inputs):
    """Lay the inputs' vocabulary rows out in the output vocabulary (mergesmith.vocab)."""
    from mergesmith.vocab import permute_rows

    refs = ([task.base.model] if task.base is not None else []) + [r.model for r in task.inputs]
    tensors = dict(zip(refs, ([base] if base is not None else []) + inputs))
    out = permute_rows(plan.vocabulary, tensors)
    return (out[task.base.model] if task.base is not None else None), [out[r.model] for r in task.inputs]


def _read(
    plan: Plan,
    task: TensorTask,
    device: torch.device,
    rows: Optional[Tuple[int, int]],
    check: bool,
    stored: bool = False,
):
    """The base (or None) and inputs of one block of rows (None: the whole tensor), in the output vocabulary;
    `stored`: bfloat16 inputs as stored (_load)."""
    stored = stored and not task.vocab
    base = _load(plan, task.base, device, rows, check, stored) if task.base is not None else None
    inputs = [_load(plan, r, device, rows, check, stored) for r in task.inputs]
    if stored and len({t.dtype for t in [base, *inputs] if t is not None}) > 1:  # no kernel takes mixed dtypes
        base, *inputs = [t if t is None or t.dtype != torch.bfloat16 else compiled.widen(t)[0] for t in [base, *inputs]]
    if task.vocab:
        base, inputs = _permute(plan, task, base, inputs)
    return base, inputs


def _prefetch(plan: Plan, task: TensorTask, blocks: Sequence[Tuple[int, int]], k: int) -> None:
    """Start reading block k of every input (if there is one): row blocks are read while earlier ones compute."""
    if k < len(blocks):
        rows = blocks[k] if len(blocks) > 1 else None
        for ref in ([task.base] if task.base is not None else []) + list(task.inputs):
            ahead = getattr(plan.models[ref.model], "prefetch", None)  # readers in memory have nothing to fetch
            if ahead is not None:
                ahead(ref.name, rows)


def _statistic(
    plan: Plan,
    task: TensorTask,
    device: torch.device,
    blocks: List[Tuple[int, int]],
    two_pass: TwoPass,
    width: int,
    gate: Callable,
):
    """Pass 1 of a two-pass merge: each round reads every block, folds the blocks' partials in block order into
    the previous round's result and finishes it. The inputs are checked for NaN/Inf on the first read."""
    method, stat = plan.method, None
    for r, rnd in enumerate(two_pass.rounds):

        def partial(k: int, rnd=rnd, prev=stat, check: bool = r == 0):
            ab = blocks[k]
            _prefetch(plan, task, blocks, k + width)
            with gate():
                return _partial(plan, task, device, two_pass, rnd, prev, ab, check)

        total = stat
        for k in range(width):
            _prefetch(plan, task, blocks, k)
        for part in in_order(partial, range(len(blocks)), width):
            total = rnd.reduce(total, part)
        stat = method.call(rnd.finish, task.shared, task.per_input, stat=total) if rnd.finish else total
    return stat


def _partial(
    plan: Plan, task: TensorTask, device: torch.device, two_pass: TwoPass, rnd, prev, ab: Tuple[int, int], check: bool
):
    """One block's share of a round of pass 1 (its `collect`)."""
    base, inputs = _read(plan, task, device, ab, check, two_pass.stored_inputs)
    return plan.method.call(
        rnd.collect,
        task.shared,
        task.per_input,
        base=base,
        inputs=inputs,
        keys=task.keys,
        row_offset=ab[0],
        stat=prev,
    )


class TensorNotes:
    """What kernels report about single tensors (their `report(note)`), gathered over a run: each note becomes one
    warning at the end, saying how many tensors it concerns and naming the first few."""

    SHOWN = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tensors: Dict[str, Dict[str, None]] = {}  # note -> tensor names, in order, once each

    def reporter(self, tensor: str) -> Callable[[str], None]:
        def report(note: str) -> None:
            with self._lock:
                self._tensors.setdefault(note, {})[tensor] = None

        return report

    def flush(self) -> None:
        with self._lock:
            found, self._tensors = self._tensors, {}
        for note, tensors in found.items():
            names = list(tensors)
            shown = ", ".join(names[: self.SHOWN]) + (", ..." if len(names) > self.SHOWN else "")
            warn(f"{note}: {len(names)} tensor{'s' if len(names) != 1 else ''} ({shown})")


def compute_blocks(
    plan: Plan,
    task: TensorTask,
    device: torch.device,
    notes: Optional[TensorNotes] = None,
    gate: Callable = contextlib.nullcontext,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield (first_row, block) of one output tensor, in its output dtype, on the CPU. The kernel's notes go to
    `notes` (without one, each is a warning naming the tensor). Each block is read and computed inside `gate()`
    (the executor's bound on blocks computing at once, over all tensors in flight)."""
    blocks = row_blocks(plan, task)
    if task.kind == "copy":
        warned = False
        for k, (a, b) in enumerate(blocks):
            _prefetch(plan, task, blocks, k + 1)
            out, warned = _copy(plan, task, (a, b) if len(blocks) > 1 else None, warned)
            yield a, out
        return
    method = plan.method
    two_pass = method.two_pass(task.shared) if len(blocks) > 1 else None
    # BLOCKS blocks of a tensor at a time (one more than the tensors in flight), so a tensor left alone keeps both
    # cores busy even where a block takes longer than the next; the gate bounds the blocks computing over all
    # tensors. Results are used in block order either way: same bytes.
    width = BLOCKS if len(blocks) > 1 else 1
    stat = _statistic(plan, task, device, blocks, two_pass, width, gate) if two_pass is not None else None
    report = notes.reporter(task.name) if notes is not None else (lambda note: warn(f"tensor {task.name}: {note}"))

    def merge_block(k: int) -> Tuple[int, torch.Tensor]:
        _prefetch(plan, task, blocks, k + width)
        with gate():
            return merged(k)

    def merged(k: int) -> Tuple[int, torch.Tensor]:
        a, b = blocks[k]
        rows, stored = ((a, b) if len(blocks) > 1 else None), two_pass is not None and two_pass.stored_merge
        base, inputs = _read(plan, task, device, rows, check=two_pass is None, stored=stored)
        share = two_pass.share(stat, k) if two_pass is not None else None
        out = (
            method.merge(base, inputs, task.shared, task.per_input, task.keys, row_offset=a, stat=share, report=report)
            if inputs
            else base
        )
        del inputs, base
        return a, _output(task, out)

    for k in range(width):
        _prefetch(plan, task, blocks, k)
    yield from in_order(merge_block, range(len(blocks)), width)


def in_order(fn: Callable, items: Sequence, width: int) -> Iterator:
    """fn(item) for each item, `width` at a time on threads, yielded in the items' order."""
    if width <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="block") as pool:
        window: List[Future] = []
        try:
            for it in items:
                window.append(pool.submit(fn, it))
                if len(window) >= width:
                    yield window.pop(0).result()
            while window:
                yield window.pop(0).result()
        finally:
            for f in window:
                f.cancel()


def compute_tensor(plan: Plan, task: TensorTask, device: torch.device) -> torch.Tensor:
    """One whole output tensor (for tests and tools; the executor streams blocks instead)."""
    parts = [t for _, t in compute_blocks(plan, task, device)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def can_resume(plan: Plan, partial: Path) -> bool:
    """The shard files of an interrupted run are all there, at their planned sizes."""
    for name, size in zip(plan.layout.files, plan.layout.sizes):
        f = partial / name
        if not f.exists() or f.stat().st_size != size:
            return False
    return True


def keeps_state(plan: Plan, task: TensorTask) -> bool:
    """Two-pass tensors in row blocks whose statistic keeps per-element state between the passes (DARE/DELLA's
    keep masks for their whole-tensor L1 sums: 1 bit per element and model; TwoPass.keeps_state). Two of them in
    flight (an embedding and an lm_head) would add up, so they take turns: peak memory is then the same whatever
    the order of the tensors and the number of layers (bench/RESULTS.md, run U, has the measurements)."""
    return task.kind == "merge" and plan.method.keeps_state(task.shared) and len(row_blocks(plan, task)) > 1


WORKERS = 2  # tensors in flight: one reading while another computes; torch uses the cores within each
BLOCKS = WORKERS + 1  # blocks read and computed at once, over all tensors: one more than WORKERS keeps both cores fed


class _Runner:
    """Computes tensors into the shard files, WORKERS at a time, journaling each one after its bytes are written;
    tensors that keep per-element state between passes take turns (keeps_state)."""

    def __init__(self, plan: Plan, dev: torch.device, writer: ShardWriter, journal, crcs: Dict[str, int], bar):
        self.plan, self.dev, self.writer, self.journal, self.crcs, self.bar = plan, dev, writer, journal, crcs, bar
        self.notes = TensorNotes()  # the kernels' notes, one warning each at the end
        self.slots = threading.Semaphore(WORKERS)
        self.turns = threading.Semaphore(1)
        self.computing = threading.BoundedSemaphore(BLOCKS)
        self.lock = threading.Lock()
        self.failed: List[BaseException] = []
        self.delay = float(os.environ.get("MERGESMITH_TEST_TENSOR_DELAY", "0"))  # tests only: widen the kill window

    def work(self, task: TensorTask, heavy: bool) -> None:
        try:
            if self.failed:
                return
            c = 0
            for row, block in compute_blocks(self.plan, task, self.dev, self.notes, gate=lambda: self.computing):
                c = zlib.crc32(self.writer.write(task.name, block, row_offset=row), c)
            if self.delay:
                time.sleep(self.delay)
            with self.lock:
                self.journal.record(task.name, c)
                self.crcs[task.name] = c
                self.bar.update(self.plan.layout.slots[task.name].nbytes)
                self.bar.set_postfix_str(
                    f"{len(self.crcs)}/{len(self.plan.tasks)} tensors, {task.name[-32:]}", refresh=False
                )
        except BaseException as e:
            self.failed.append(e)
            raise
        finally:
            self.slots.release()
            if heavy:
                self.turns.release()

    def run(self, order: Sequence[TensorTask]) -> None:
        futures: List[Future] = []
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="merge") as pool:
            for task in order:
                heavy = keeps_state(self.plan, task)
                self.slots.acquire()
                if heavy:
                    self.turns.acquire()
                if self.failed:
                    self.slots.release()
                    if heavy:
                        self.turns.release()
                    break
                futures.append(pool.submit(self.work, task, heavy))
            wait(futures)
        if self.failed:
            raise self.failed[0]


def _still_done(plan: Plan, partial: Path, writer: ShardWriter) -> Dict[str, int]:
    """{name: crc} of the journaled tensors whose bytes in the shards still match their CRC (kept on resume)."""
    from mergesmith.journal import crc, done_tensors

    return {
        name: c
        for name, c in done_tensors(partial).items()
        if name in plan.layout.slots and crc(writer.read_back(name)) == c
    }


def execute(
    plan: Plan,
    partial: Path,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: bool = True,
    resume: bool = False,
) -> int:
    """Compute every tensor of the plan into the shard files in `partial`; returns how many were already done."""
    from tqdm import tqdm

    from mergesmith.journal import Journal
    from mergesmith.outdir import write_checksums

    dev = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    writer = ShardWriter(partial, plan.layout, create=not resume)
    crcs = _still_done(plan, partial, writer) if resume else {}  # for the checksum list of the finished folder
    done = len(crcs)
    journal = Journal(partial, plan, fresh=not resume)
    order = sorted(
        (t for t in plan.tasks if t.name not in crcs),
        key=lambda t: (plan.layout.slots[t.name].shard, plan.layout.slots[t.name].offset),
    )
    bar = tqdm(
        total=plan.bytes_written,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=not progress,
        dynamic_ncols=True,
        initial=sum(plan.layout.slots[n].nbytes for n in crcs),
    )
    runner = _Runner(plan, dev, writer, journal, crcs, bar)
    t0 = time.monotonic()
    try:
        runner.run(order)
    finally:
        bar.close()
        runner.notes.flush()
        journal.close()
        writer.close(sync=not runner.failed)
    write_index(partial, plan.layout)
    write_checksums(partial, plan.layout, crcs)
    log.debug(
        f"merged {len(order)} tensors in {time.monotonic() - t0:.1f} s" + (f" ({done} done before)" if done else "")
    )
    return done
