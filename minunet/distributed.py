"""Several processes (ranks) started by MPI: data-parallel training, and evaluate, predict and quantify with their
inputs shared out (mpi4py).

``mpiexec -n 4 minunet train ...`` starts four copies of the command; ``world()`` gives each its
``Ranks``: which rank it is, how many there are, and the few collective operations training needs.
One process (no ``mpiexec``, or ``-n 1``) gets a ``Ranks`` of size 1 whose operations do nothing,
so a single-process run takes exactly the steps it always did. mpi4py is imported only when the
launcher's variables say there are several ranks, so ``import minunet`` never needs it.

What the ranks share (docs/internals.md, "Training on several processes (MPI)", says why):

    shard(n)             this rank's contiguous part [lo, hi) of a batch of n images
    sum_gradients(...)   every rank's gradient gathered on rank 0, added in rank order, sent back
    share_state(...)     parameters, Adam moments and the position sent from rank 0, then compared
    evaluate(...)        each rank scores whole validation batches (batch_range); the per-image counts
                         are merged (merged)
    gather(value)        every rank's value on rank 0, in rank order (the commands' rows and counts)
    command(...)         around a command whose inputs the ranks share (evaluate, predict, quantify):
                         its own share of the threads and GPUs, and its errors handled as below
    agree(fn)            fn() on every rank; an error on any rank is raised on every rank
    local_first(fn)      fn() on the first rank of each machine, then on the others (the data cache)
    any(flag)            whether any rank raised ``flag`` (a stop request)

An error that only some ranks meet (a file rank 0 cannot write, a bug) would leave the others
waiting for it forever: ``ending_every_rank_on_error`` prints it and calls ``MPI_Abort``, which ends
every rank of the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import replace

import numpy as np

from minunet.atomicfile import HOST
from minunet.data import ArraySet, MaskStats, num_batches
from minunet.errors import ConfigError, MinunetError
from minunet.evaluation import EvalResult, evaluate_model, mean_loss
from minunet.metrics import ScoreAccumulator, dice_from_counts

# Set by the launchers for every process they start: MPICH and Intel MPI (Hydra), Slurm's srun with
# PMI-2; Open MPI; MVAPICH. Read before mpi4py is imported, so one process never initialises MPI.
LAUNCH_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_size() -> int:
    """How many ranks the MPI launcher says it started (1 when not started by one)."""
    for var in LAUNCH_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def shard_range(n: int, parts: int, k: int) -> tuple[int, int]:
    """Part k of ``range(n)`` cut into ``parts`` contiguous pieces: the first ``n % parts`` pieces hold one
    more element than the others (3 images on 2 ranks: [0, 2) and [2, 3); 1 image on 2 ranks: [0, 1), [1, 1))."""
    base, extra = divmod(n, parts)
    lo = k * base + min(k, extra)
    return lo, lo + base + (k < extra)


def subset(data: ArraySet, lo: int, hi: int) -> ArraySet:
    """Images lo..hi-1 of ``data`` (views of its arrays)."""
    return replace(data, images=data.images[lo:hi], masks=None if data.masks is None else data.masks[lo:hi],
                   names=list(data.names[lo:hi]), groups=list(data.groups[lo:hi]))


def merge_results(parts: list) -> EvalResult:
    """One EvalResult from those of consecutive shards of a set, in order: the summaries are computed again
    from the concatenated per-image counts, and the loss (mean BCE per image) from the batches' summed losses
    added in order, so every figure equals one evaluation of the whole set when each shard holds whole batches
    (``Ranks.batch_range``)."""
    counts = tuple(np.concatenate([p.counts[j] for p in parts]) for j in range(3))
    names = [n for p in parts for n in p.names]
    groups = [g for p in parts for g in p.groups]
    overall = ScoreAccumulator([counts[0]], [counts[1]], [counts[2]])
    summary = overall.summary()
    n = len(names)
    batch_losses = [b for p in parts for b in p.batch_losses]
    summary["loss"] = mean_loss(batch_losses, n)
    labels = np.array([g or "all" for g in groups], dtype=object)
    per_group = {}
    for g in sorted(set(labels)):
        sel = labels == g
        per_group[g] = ScoreAccumulator([counts[0][sel]], [counts[1][sel]], [counts[2][sel]]).summary()
    return EvalResult(summary, per_group, dice_from_counts(*counts), names, groups, counts, batch_losses)


def merge_mask_stats(parts: list) -> MaskStats:
    """One MaskStats from those of the shards of a set: every count added up."""
    total = MaskStats()
    for p in parts:
        for k, n in p.counts.items():
            total.counts[k] = total.counts.get(k, 0) + n
        total.colour += p.colour
        for note, n in p.images.items():
            total.images[note] = total.images.get(note, 0) + n
    return total


def limit_threads(n: int):
    """Run this process's kernels on ``n`` threads: the numba backend's pool and NumPy's OpenBLAS."""
    from minunet.kernels.numba import threads

    threads.set_threads(n)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Ranks:
    """This process's place among the ranks of an MPI job (``comm`` None: a single process)."""

    def __init__(self, comm=None):
        self.comm = comm
        self.size = comm.Get_size() if comm is not None else 1
        self.rank = comm.Get_rank() if comm is not None else 0
        self.local = None  # the ranks on this machine (shared memory)
        self.local_rank, self.local_size = 0, 1
        if comm is not None:
            from mpi4py import MPI

            self.local = comm.Split_type(MPI.COMM_TYPE_SHARED)
            self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def default_threads(self) -> int:
        """Threads per rank when --threads is not given: this machine's cores shared by its ranks."""
        return max(1, cores() // self.local_size)

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's images [lo, hi) of a batch of n (``shard_range``)."""
        return shard_range(n, self.size, self.rank)

    # -- agreeing -------------------------------------------------------------

    def agree(self, fn, catch=(MinunetError,)):
        """``fn()`` on every rank. When it raises one of ``catch`` on any rank, every rank raises: the error of
        the lowest failing rank (its message says which rank and host when that is not rank 0), marked
        ``on_every_rank`` so the command line prints it once (on rank 0)."""
        try:
            value, error = fn(), None
        except catch as e:
            value, error = None, e
        if self.size == 1:
            if error is not None:
                raise error
            return value
        errors = self.comm.allgather((error, HOST))
        failed = [(k, e, host) for k, (e, host) in enumerate(errors) if e is not None]
        if not failed:
            return value
        k, first, host = failed[0]
        if k != 0 and isinstance(first, MinunetError):
            first = type(first)(f"rank {k} of {self.size} (on {host}): {first}")
        first.on_every_rank = True
        raise first

    def from_root(self, fn):
        """``fn()`` run on rank 0 alone, its value (or MinunetError) given to every rank: reading the run
        folder, which the other ranks may not see (another machine)."""
        if self.size == 1:
            return fn()
        value, error = None, None
        if self.is_root:
            try:
                value = fn()
            except MinunetError as e:
                error = e
        value, error = self.comm.bcast((value, error), root=0)
        if error is not None:
            error.on_every_rank = True
            raise error
        return value

    def local_first(self, fn, catch=(MinunetError,)):
        """``fn()`` on the first rank of each machine, then on the machine's other ranks (which then find
        what it cached), as one ``agree``."""
        if self.size == 1:
            return fn()
        value, error = None, None
        if self.local_rank == 0:
            try:
                value = fn()
            except catch as e:
                error = e
        if self.local.bcast(error is None, root=0) and self.local_rank != 0:
            try:
                value = fn()
            except catch as e:
                error = e

        def report():
            if error is not None:
                raise error
            return value

        return self.agree(report, catch)

    def any(self, flag) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
        if self.size == 1:
            return bool(flag)
        return any(self.comm.allgather(bool(flag)))

    def gather(self, value) -> list | None:
        """Every rank's ``value`` on rank 0, in rank order (``[value]`` in one process); None on the others."""
        return [value] if self.size == 1 else self.comm.gather(value, root=0)

    def all_gather(self, value) -> list:
        """Every rank's ``value`` on every rank, in rank order (``[value]`` in one process)."""
        return [value] if self.size == 1 else self.comm.allgather(value)

    def check_same(self, value: bytes, what: str):
        """Raise ConfigError on every rank unless ``value`` is the same on every rank."""
        if self.size == 1:
            return
        digests = self.comm.allgather(hashlib.sha256(value).hexdigest())
        odd = [k for k, d in enumerate(digests) if d != digests[0]]
        if odd:
            e = ConfigError(f"rank {odd[0]} of {self.size} sees other {what} than rank 0: every machine must see "
                            "the same files at the same paths")
            e.on_every_rank = True
            raise e

    @contextlib.contextmanager
    def ending_every_rank_on_error(self):
        """Around a whole distributed command: an exception that not every rank raised (``agree`` marks those
        that did) is printed with this rank's number, then ``MPI_Abort`` ends every rank of the job; the
        others would otherwise wait for this one forever. Files are written whole or not at all
        (atomicfile), so the last checkpoint is intact."""
        try:
            yield
        except BaseException as e:
            if self.size == 1 or getattr(e, "on_every_rank", False) or isinstance(e, SystemExit):
                raise
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            print(f"minunet: rank {self.rank} of {self.size} (on {HOST}) stopped: {what}; ending every rank "
                  "(MPI_Abort)", file=sys.stderr, flush=True)
            if not isinstance(e, (MinunetError, KeyboardInterrupt)):
                import traceback

                traceback.print_exc()
            self.comm.Abort(130 if isinstance(e, KeyboardInterrupt) else 1)

    @contextlib.contextmanager
    def command(self, backend: str = "numpy", exit_status: int = 2):
        """Around a command whose inputs the ranks share: with several ranks, each runs on its share of the
        machine's cores (``default_threads``) and, for ``backend`` auto or cupy, on its local rank's GPU.
        An error every rank raised (``agree``, ``from_root``) is rank 0's to print: the others exit with
        ``exit_status`` without a word. Any other error ends every rank (``ending_every_rank_on_error``) at
        once: a rank that meets a bad file halfway through its share does not leave the others working for
        hours and then waiting for it."""
        try:
            with self.ending_every_rank_on_error():
                if self.size > 1:
                    limit_threads(self.default_threads())
                    if backend.lower() in ("auto", "cupy"):
                        self.pick_gpu()
                yield
        except Exception as e:
            if getattr(e, "on_every_rank", False) and not self.is_root:
                sys.exit(exit_status)
            raise

    # -- arrays ---------------------------------------------------------------

    def _bcast_arrays(self, arrays: dict, backend):
        """Overwrite every rank's ``arrays`` (name -> backend array) with rank 0's, as one flat buffer."""
        flat = np.concatenate([np.asarray(backend.to_host(a)).ravel() for a in arrays.values()])
        self.comm.Bcast(flat, root=0)
        _unflatten(flat, arrays, backend)
        return flat

    def sum_gradients(self, grads: dict, loss_part: float, backend) -> float:
        """Replace every rank's ``grads`` by their sum over the ranks and return the summed ``loss_part``.

        The flat gradients are gathered on rank 0 and added in rank order (rank 0's, plus rank 1's,
        plus ...), then broadcast: every rank gets the same bytes, and the same ranks give the same bytes
        run after run (an MPI Allreduce may add in any order). The losses are added in rank order too."""
        if self.size == 1:
            return loss_part
        flat = np.concatenate([np.asarray(backend.to_host(g)).ravel() for g in grads.values()])
        parts = np.empty((self.size, flat.size), flat.dtype) if self.is_root else None
        self.comm.Gather(flat, parts, root=0)
        if self.is_root:
            flat = parts[0].copy()
            for p in parts[1:]:
                flat += p
        self.comm.Bcast(flat, root=0)
        _unflatten(flat, grads, backend)
        total = 0.0
        for part in self.comm.allgather(float(loss_part)):
            total += part
        return total

    def share_state(self, model, optimizer, state: dict) -> dict:
        """Rank 0's parameters, Adam moments and step count on every rank, and its ``state`` returned; then a
        checksum of the parameters and moments compared across the ranks (ConfigError if any differs)."""
        if self.size == 1:
            return state
        be = model.backend
        digest = hashlib.sha256()
        for arrays in (model.params, optimizer.m, optimizer.v):
            digest.update(self._bcast_arrays(arrays, be).tobytes())
        optimizer.t, state = self.comm.bcast((optimizer.t, state), root=0)
        self.check_same(digest.digest(), "parameters after the broadcast from rank 0")
        return state

    def batch_range(self, n: int, batch_size: int) -> tuple[int, int]:
        """This rank's items [lo, hi) of n scored in batches of ``batch_size``: a contiguous run of whole
        batches (``shard_range`` over the batches), so each batch holds the images it holds in one process."""
        b_lo, b_hi = shard_range(num_batches(n, batch_size), self.size, self.rank)
        return b_lo * batch_size, min(b_hi * batch_size, n)

    def merged(self, mine: EvalResult) -> EvalResult:
        """Every rank's EvalResult of its ``batch_range``, merged in rank order (``merge_results``), on every
        rank."""
        return mine if self.size == 1 else merge_results(self.comm.allgather(mine))

    def evaluate(self, model, data: ArraySet, batch_size: int, progress=None, **kw) -> EvalResult:
        """``evaluate_model`` with the set's batches shared out (``batch_range``): the same batches one process
        would score, so the same logits, and the per-image counts merged (``merged``): Dice and IoU equal one
        process's exactly. Every rank gets the result; ``progress`` is called on rank 0 for its part."""
        if self.size == 1:
            return evaluate_model(model, data, batch_size, progress=progress, **kw)
        lo, hi = self.batch_range(len(data), batch_size)
        mine = evaluate_model(model, subset(data, lo, hi), batch_size, progress=progress if self.is_root else None,
                              **kw)
        return self.merged(mine)

    def pick_gpu(self):
        """With several ranks on a machine, rank i of the machine uses GPU i (modulo the GPUs it has)."""
        if self.size == 1:
            return
        try:
            import cupy
        except ImportError:
            return
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # no driver or no device: open_backend says so for --backend cupy
            return
        if n:
            cupy.cuda.Device(self.local_rank % n).use()


def _unflatten(flat: np.ndarray, arrays: dict, backend):
    """Copy consecutive pieces of ``flat`` into ``arrays`` (name -> backend array), in their order."""
    at = 0
    for a in arrays.values():
        n = int(np.prod(a.shape))
        a[...] = backend.asarray(flat[at : at + n].reshape(a.shape), dtype=a.dtype)
        at += n


_WORLD: Ranks | None = None


def world() -> Ranks:
    """This process's ``Ranks``: of size 1 unless an MPI launcher started several ranks (then mpi4py is
    imported, which starts MPI). ConfigError when started by one but mpi4py is not installed."""
    global _WORLD
    if _WORLD is None:
        n = launched_size()
        if n <= 1:
            _WORLD = Ranks()
        else:
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise ConfigError(f"started by mpiexec as one of {n} processes, but mpi4py cannot be imported "
                                  f"({e}): pip install 'minunet[mpi]' (mpi4py and an MPI), or run one process "
                                  "without mpiexec") from None
            comm = MPI.COMM_WORLD
            _WORLD = Ranks(comm if comm.Get_size() > 1 else None)
    return _WORLD
