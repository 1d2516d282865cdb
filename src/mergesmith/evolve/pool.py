"""Where candidates are scored: in this process (one local worker), or on Ray actors (local Ray with N workers, or
a running cluster). Results come back in completion order; the driver puts them in candidate order."""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

from mergesmith.errors import MergeError, warn

Job = Dict[str, Any]
Result = Dict[str, Any]
# a candidate whose worker died this often is not tried again (it is the candidate, not bad luck)
MAX_TRIES = 3


class LocalPool:
    """One worker in this process: no Ray needed."""

    workers = 1

    def __init__(self, setup: Dict[str, Any]):
        import torch

        from mergesmith.evolve.worker import Scorer

        self.threads = torch.get_num_threads()  # the worker sets its own; this process gets its own back after
        self.scorer = Scorer(setup)

    def run(self, jobs: Sequence[Job], on_result: Callable[[Result], None]) -> None:
        for j in jobs:
            on_result(self.scorer.run(j))

    def close(self) -> None:
        import torch

        self.scorer = None
        torch.set_num_threads(self.threads)


def ray_module():
    try:
        import ray
    except ImportError:
        raise MergeError("--workers above 1 and --ray-address need Ray: pip install 'mergesmith[evolve]'") from None
    return ray


class RayPool:
    """One Ray actor per worker, each holding the inputs; a dead actor is replaced and its candidate re-run."""

    def __init__(self, setup: Dict[str, Any], workers: Optional[int], address: Optional[str], num_gpus: float = 0):
        ray = self.ray = ray_module()
        self._own_temp = None
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            self._own_temp = tempfile.mkdtemp(prefix="ms-ray-")
            ray.init(
                num_cpus=workers or 1,
                num_gpus=num_gpus or None,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                _temp_dir=self._own_temp,
                object_store_memory=100 * 1024**2,
            )
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        from mergesmith.evolve.worker import Scorer

        gpus = (num_gpus / self.workers) if num_gpus else 0
        self._cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(Scorer)
        self.setup = setup
        self.actors = [self._cls.remote(setup) for _ in range(self.workers)]

    def run(self, jobs: Sequence[Job], on_result: Callable[[Result], None]) -> None:
        ray = self.ray
        queue: List[Job] = list(jobs)
        tries: Dict[Any, int] = {}
        idle = list(self.actors)
        pending: Dict[Any, Any] = {}
        while queue or pending:
            while queue and idle:
                actor, job = idle.pop(0), queue.pop(0)
                pending[actor.run.remote(job)] = (actor, job)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                actor, job = pending.pop(ref)
                result = self._result(ref, job, tries)
                if result is None:  # the worker died: a new one takes its place, the candidate goes first
                    self._replace(actor)
                    idle.append(self.actors[-1])
                    queue.insert(0, job)
                else:
                    idle.append(actor)
                    on_result(result)

    def _result(self, ref, job: Job, tries: Dict[Any, int]) -> Optional[Result]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            n = tries[job["index"]] = tries.get(job["index"], 0) + 1
            if n >= MAX_TRIES:
                raise MergeError(
                    f"candidate {job['index']} killed its worker {n} times (out of memory?); rerun to try it again"
                ) from None
            warn(f"a worker died scoring candidate {job['index']}; starting a new one and scoring it again")
            return None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, MergeError):
                raise MergeError(str(cause)) from None
            raise

    def _replace(self, actor) -> None:
        try:
            self.ray.kill(actor)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.actors = [a for a in self.actors if a is not actor] + [self._cls.remote(self.setup)]

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self.ray.shutdown()
        if self._own_temp:
            import shutil

            shutil.rmtree(self._own_temp, ignore_errors=True)


def make_pool(setup: Dict[str, Any], workers: Optional[int], address: Optional[str], num_gpus: float = 0):
    """In-process for one local worker; Ray otherwise (workers None: one per CPU of the cluster)."""
    if workers == 1 and not address:
        return LocalPool(setup)
    return RayPool(setup, workers, address, num_gpus)
