"""Data-parallel analysis under ``torch.distributed``, with results independent of the split.

Sample selection and the contribution profile (see :mod:`modellego.analysis.profile`) can
run on several processes: the samples are cut into fixed global *chunks* of consecutive
samples (the batch size), chunk ``i`` is computed by rank ``i % world_size``, and the
per-chunk results are exchanged and added up **in chunk order** on every rank. A
single process walks the very same chunks in the same order, so every float64 sum — and
therefore the component that comes out — is bit for bit the same for any number of
processes (given the same hardware, library versions and threads per process).

Nothing here is used unless the environment says so: :func:`init_from_env` returns the
single-process :data:`SINGLE` context when ``WORLD_SIZE`` is unset or 1, without touching
``torch.distributed``. With ``WORLD_SIZE > 1`` (``torchrun`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) it initialises the default process group
from those variables, with the ``nccl`` backend when CUDA is available and ``gloo``
otherwise. Collectives are called on CPU tensors; under nccl they are staged through the
process's GPU (``cuda:LOCAL_RANK``).

One machine, four processes::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 -m modellego disassemble model.safetensors \\
        --classes 1,3 --out part.safetensors --report part.json

Several machines (run the same command on every machine; all must see the model file and
the data, and can reach the endpoint's host and port)::

    # static: one fixed master, explicit node ranks 0..nnodes-1
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
        --master-addr 10.0.0.1 --master-port 29500 -m modellego disassemble ...
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 \\
        --master-addr 10.0.0.1 --master-port 29500 -m modellego disassemble ...

    # elastic rendezvous: same command everywhere, a shared job id and endpoint
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint 10.0.0.1:29400 --rdzv-id lego-job-1 -m modellego disassemble ...

Only global rank 0 writes the output files and prints; the other ranks compute the same
component (every rank ends with the full statistics) and exit quietly with status 0.
Byte-identical output across world sizes needs the same number of threads per process:
``torchrun`` sets ``OMP_NUM_THREADS=1`` unless it is set, so compare with a single-process
run under ``OMP_NUM_THREADS=1`` (or set it explicitly for both).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping

import torch

from ..errors import ModelLegoError

__all__ = ["SINGLE", "DistContext", "chunk_ranges", "distributed_from_env", "env_settings",
           "gather_chunks", "init_from_env"]


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """The global chunks ``[(start, stop), ...]`` of ``n`` samples, ``size`` at a time."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class DistContext:
    """Where this process sits in a data-parallel job; ``world_size == 1`` is one process.

    The collectives take and return CPU tensors and are no-ops for a single process.
    Subclasses may override :meth:`all_gather` (the tests emulate ranks with threads).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, *, local_rank: int = 0,
                 backend: str | None = None, owns_group: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend = backend
        self._owns_group = owns_group

    def __repr__(self) -> str:
        return (f"DistContext(rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r})")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, chunk: int) -> bool:
        """Whether this rank computes global chunk ``chunk`` (round-robin assignment)."""
        return chunk % self.world_size == self.rank

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order.

        The bits arrive unchanged, so results combined from the list in a fixed order are
        the same on every rank.
        """
        if not self.distributed:
            return [tensor]
        import torch.distributed as dist

        x = tensor.detach().contiguous().to(self._device())
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x)
        return [t.cpu() for t in out]

    def close(self) -> None:
        """Destroy the process group if this context created it (idempotent)."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False


#: The single-process context.
SINGLE = DistContext()


#: Environment variable: seconds to wait for all processes to join (default 60).
TIMEOUT_VAR = "MODELLEGO_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
_FIX = "start the command with torchrun, or unset WORLD_SIZE to run in one process"


def _env_int(env: Mapping[str, str], name: str, lo: int, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        raise ModelLegoError(f"environment variable {name} is not set but WORLD_SIZE="
                             f"{env.get('WORLD_SIZE')} asks for a distributed run; {_FIX}")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ModelLegoError(f"environment variable {name}={raw!r} is not an integer; "
                             f"{_FIX}") from None
    if value < lo or (hi is not None and value > hi):
        want = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ModelLegoError(f"environment variable {name}={value} must be {want}; {_FIX}")
    return value


def _timeout(env: Mapping[str, str]) -> float:
    raw = env.get(TIMEOUT_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise ModelLegoError(f"environment variable {TIMEOUT_VAR}={raw!r} must be a number "
                             "of seconds > 0; e.g. 60")
    return value


def env_settings(env: Mapping[str, str]) -> tuple[int, int, int, float]:
    """``(rank, world_size, local_rank, timeout)`` from torchrun's variables, checked.

    ``WORLD_SIZE`` unset, empty or 1 is one process. Otherwise ``RANK`` must be in
    ``0..WORLD_SIZE-1``, ``LOCAL_RANK`` (default 0) at most ``RANK`` and below
    ``LOCAL_WORLD_SIZE`` when that is set, ``MASTER_ADDR`` and ``MASTER_PORT`` present;
    ``MODELLEGO_DIST_TIMEOUT`` bounds the wait for the other processes. Anything else is a
    one-line :class:`~modellego.errors.ModelLegoError` instead of a traceback or a hang.
    """
    if not (env.get("WORLD_SIZE") or "").strip():
        return 0, 1, 0, DEFAULT_TIMEOUT
    world = _env_int(env, "WORLD_SIZE", 1)
    if world == 1:
        return 0, 1, 0, DEFAULT_TIMEOUT
    rank = _env_int(env, "RANK", 0, world - 1)
    local_rank = 0
    if (env.get("LOCAL_RANK") or "").strip():
        local_rank = _env_int(env, "LOCAL_RANK", 0, rank)
    if (env.get("LOCAL_WORLD_SIZE") or "").strip():
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1, world)
        if local_rank >= local_world:
            raise ModelLegoError(f"environment variable LOCAL_RANK={local_rank} must be below "
                                 f"LOCAL_WORLD_SIZE={local_world}; {_FIX}")
    if not (env.get("MASTER_ADDR") or "").strip():
        raise ModelLegoError(f"environment variable MASTER_ADDR is not set but WORLD_SIZE="
                             f"{world} asks for a distributed run; {_FIX}")
    _env_int(env, "MASTER_PORT", 1, 65535)
    return rank, world, local_rank, _timeout(env)


def _wait_for_listener(addr: str, port: int, timeout: float) -> None:
    """Return once something accepts connections at ``addr:port``; OSError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(1.0, timeout)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise OSError(f"nothing accepted a connection: {exc.strerror or exc}"
                              ) from exc
            time.sleep(0.2)


def init_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """The context described by ``torchrun``'s environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is :data:`SINGLE` and
    ``torch.distributed`` is left alone. Otherwise the variables are checked
    (:func:`env_settings`) and the default process group is initialised (``env://``:
    ``MASTER_ADDR``/``MASTER_PORT``) unless it already is, waiting at most
    ``MODELLEGO_DIST_TIMEOUT`` seconds (default 60) for every process to join; the
    returned context destroys it on :meth:`~DistContext.close` only if it created it.
    """
    env = os.environ if env is None else env
    rank, world, local_rank, timeout = env_settings(env)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank=local_rank,
                           backend=dist.get_backend(), owns_group=False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    addr, port = env["MASTER_ADDR"].strip(), int(env["MASTER_PORT"])
    # under torchrun the agent already serves the store: every rank is a client
    serve = rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        if not serve:  # wait here, quietly: torch's own connect timeout logs a C++ trace
            _wait_for_listener(addr, port, timeout)
        # the store bounds the rendezvous only; collectives keep torch's default timeout
        store = dist.TCPStore(addr, port, world, is_master=serve,
                              timeout=datetime.timedelta(seconds=timeout),
                              wait_for_workers=serve)
    except (RuntimeError, OSError) as exc:  # DistStoreError / DistNetworkError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLegoError(
            f"rank {rank} of {world}: the processes did not all meet at {addr}:{port} within "
            f"{timeout:g} s ({reason[:200]}); start every rank (torchrun), check MASTER_ADDR "
            f"and MASTER_PORT, or raise {TIMEOUT_VAR}") from exc
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank=local_rank, backend=backend, owns_group=True)


@contextlib.contextmanager
def distributed_from_env() -> Iterator[DistContext]:
    """``with distributed_from_env() as ctx:`` — :func:`init_from_env`, closed on exit."""
    ctx = init_from_env()
    try:
        yield ctx
    finally:
        ctx.close()


def gather_chunks(mine: list[torch.Tensor], sizes: list[int],
                   dist: "DistContext") -> list[torch.Tensor]:
    """All chunks' 1-D float64 results in chunk order, from each rank's own chunks.

    ``mine`` are this rank's chunks (``j % world_size == rank``) in order; ``sizes[j]`` is
    chunk ``j``'s length. Each rank sends its chunks packed into one buffer (padded to the
    longest rank's), so the exchange holds about one copy of all results.
    """
    if not dist.distributed:
        return mine
    w = dist.world_size
    per_rank = [sum(sizes[r::w]) for r in range(w)]
    buf = torch.zeros(max(per_rank), dtype=torch.float64)
    if mine:
        packed = torch.cat(mine)
        buf[:len(packed)] = packed
    gathered = dist.all_gather(buf)
    offsets = [0] * w
    out = []
    for j, size in enumerate(sizes):
        r = j % w
        out.append(gathered[r][offsets[r]:offsets[r] + size])
        offsets[r] += size
    return out
