"""The Executor: the only part with threads and I/O.

Walks the plan in output-file order, reads each tensor's inputs through mmap, upcasts to float32, calls the method's
kernel, rounds once to the output dtype and writes the bytes straight to their place in the output shard. A bounded
number of tensors is in flight, so memory follows the largest tensor, not the model. Work happens in
`OUT_DIR.partial/`, renamed to OUT_DIR only when everything is written and checked.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import List, Optional

import torch

from mergesmith.errors import MergeError, warn
from mergesmith.io.writer import ShardWriter, write_index
from mergesmith.plan import Plan, TensorTask


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MergeError(f"unknown device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


def compute_tensor(plan: Plan, task: TensorTask, device: torch.device) -> torch.Tensor:
    """One output tensor, in its output dtype, on the CPU."""
    if task.kind == "copy":
        ref = task.inputs[0]
        t = plan.models[ref.model].read(ref.name)
        return t.to(task.out_dtype) if t.dtype.is_floating_point else t

    def load(ref) -> torch.Tensor:
        x = plan.models[ref.model].read(ref.name, take=ref.take).to(device=device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            warn(f"model {ref.model}: tensor {ref.name} holds NaN or Inf values")
        return x

    base = load(task.base) if task.base is not None else None
    inputs = [load(r) for r in task.inputs]
    out = plan.method.merge(base, inputs, task.shared, task.per_input, task.keys)
    del inputs, base
    if not torch.isfinite(out).all():
        raise MergeError(f"tensor {task.name}: the merge produced NaN or Inf (check the weights and inputs of "
                         "this tensor)")
    return out.to(dtype=task.out_dtype).cpu()


def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MergeError(f"not enough free disk in {folder}: the output needs {need / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB are free")


def prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Check OUT_DIR and make a fresh OUT_DIR.partial/ to work in."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"output {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")
    partial = out_dir.parent / (out_dir.name + ".partial")
    try:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    except OSError as e:
        raise MergeError(f"cannot create {partial}: {e.strerror}") from None
    return partial


def execute(plan: Plan, partial: Path, device: str = "cpu", threads: Optional[int] = None,
            progress: bool = True) -> None:
    """Compute every tensor of the plan into the shard files in `partial`."""
    dev = pick_device(device)
    _check_disk(partial, plan.bytes_written)
    if threads:
        torch.set_num_threads(threads)
    workers = 2  # one tensor reading while another computes; torch uses the cores within each
    writer = ShardWriter(partial, plan.layout)
    order = sorted(plan.tasks, key=lambda t: (plan.layout.slots[t.name].shard, plan.layout.slots[t.name].offset))
    from tqdm import tqdm

    bar = tqdm(total=plan.bytes_written, unit="B", unit_scale=True, desc="merging", disable=not progress,
               dynamic_ncols=True)
    slots = threading.Semaphore(workers)
    lock = threading.Lock()
    failed: List[BaseException] = []

    def work(task: TensorTask) -> None:
        try:
            if failed:
                return
            out = compute_tensor(plan, task, dev)
            writer.write(task.name, out)
            with lock:
                bar.update(plan.layout.slots[task.name].nbytes)
                bar.set_postfix_str(task.name[-40:], refresh=False)
        except BaseException as e:
            failed.append(e)
            raise
        finally:
            slots.release()

    futures: List[Future] = []
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            for task in order:
                slots.acquire()
                if failed:
                    slots.release()
                    break
                futures.append(pool.submit(work, task))
            wait(futures)
        if failed:
            raise failed[0]
    finally:
        bar.close()
        writer.close(sync=not failed)
    write_index(partial, plan.layout)
    plan.notes.append(f"merged {len(plan.tasks)} tensors in {time.monotonic() - t0:.1f} s")


def finish(partial: Path, out_dir: Path) -> None:
    """Atomically put the finished folder in place of OUT_DIR."""
    if out_dir.exists():
        old = out_dir.parent / (out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(partial, out_dir)
