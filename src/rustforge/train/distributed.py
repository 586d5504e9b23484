"""Multi-process training under `torchrun --nproc-per-node N`: PyTorch FSDP2 over the frozen base and LoRA.

Built on torch.distributed (process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK, nccl on CUDA with
NVLink multicast off, gloo on CPU) and FSDP2's `fully_shard`; own code only for what the stages need around it:

- `DistContext`: who we are; world size 1 (no torchrun) initialises nothing, so the single-process path is
  the one that ran before this module existed.
- `shard_model`: `fully_shard` on every decoder layer, then on the transformer body (`hf.model`: embeddings,
  final norm). lm_head stays a plain replicated tensor (frozen; 1.2 GB at 20B) because the chunked loss reads
  `lm_head.weight` outside any module call, where FSDP would have left it sharded. Frozen bf16 expert weights
  (nn.Parameters) are sharded like any parameter; quantised expert storage (FP8 / MXFP4) is buffers, which
  FSDP2 never shards, so each rank keeps its own copy. Inside a layer's forward and backward FSDP2 has
  swapped in unsharded plain tensors, so model/moe.py's custom autograd Functions and the router hook see
  ordinary tensors.
- Data: every rank draws the same global step (grad_accum micro-batches of batch_size sequences, the same
  deterministic order as one process) and keeps a disjoint slice: whole micro-batches when grad_accum divides
  by the world size (exact, aux loss included), else rows of each micro-batch. The global step is the config's
  whatever the world size, which is what lets a checkpoint of one world size resume at another. ipo takes
  the same slices (its pair count over the global step); grpo, whose round is already on every rank, takes
  a round-robin share of the round's micro-batches (the single-process packing), padded with an uncounted
  repeat so every rank runs as many forwards and backwards (`padded_share`).
- Sampling (core_agent's format metrics, grpo's rollouts): the rollout engine reads parameters directly,
  outside any module's forward, where FSDP leaves them sharded. `full_weights` unshards every FSDP group
  (FSDP2's `FSDPModule.unshard`, an all-gather each, in the same module order on every rank), so during it
  each rank holds the whole model and samples its own share of the prompts with no collective at all; the
  shares are exchanged afterwards (`gather_lists`). Sampling streams are the global prompt indices, so a
  prompt samples the same tokens whichever rank runs it (rollout/sampling.py is counter-based). It costs
  the whole model's parameters on every rank while sampling (FP8/MXFP4 expert buffers are whole anyway).
- Work of rank 0 alone (the pipeline's task mining and replay, export, evaluation): `on_main`, the others
  waiting on a gloo group with a long timeout.
- Checkpoints: world-size independent. LoRA weights and the optimizer state are all-gathered to full tensors
  and written by rank 0 in exactly the single-process format (PEFT adapter; `optimizer.state_dict()` keyed by
  trainable-parameter index); loading reads the full tensors on every rank and keeps each rank's shard
  (`distribute_tensor`). Own gathering rather than torch.distributed.checkpoint.state_dict: its full model
  state dict gathers the frozen base too (40 GB at 20B) and its optimizer keys are FQNs, not the
  single-process format; DTensor.full_tensor / distribute_tensor are the same in torch 2.11 and 2.13.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
from torch import nn

Batch = dict[str, torch.Tensor]

_CURRENT: DistContext | None = None
_WAIT_GROUP = None  # gloo group with a long timeout: ranks waiting for rank 0's data preparation
WAIT_TIMEOUT_S = 48 * 3600.0  # task mining and trajectory replay run for hours on big crate sets


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (world size 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops at world size 1)
    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (token counts stay exact)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (decisions that must be collective, e.g. stopping the loop)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self._comm_device())
        dist.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's (picklable) object, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_lists(self, items: list) -> list:
        """The concatenation, in rank order, of every rank's list (the inverse of `share`)."""
        return [item for part in self.all_gather_object(list(items)) for item in part]

    def share(self, n: int) -> range:
        """This rank's contiguous block of n items (sizes differ by at most one; may be empty)."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def on_main(self, fn, *args, **kwargs):
        """fn(...) on rank 0 alone while the others wait for it (data preparation, export, evaluation);
        rank 0's result, None elsewhere. The wait is on a gloo group with a long timeout (WAIT_TIMEOUT_S):
        the default group's timeout would fire during hours of task mining."""
        result = fn(*args, **kwargs) if self.is_main else None
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=_WAIT_GROUP)
        return result

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (building caches other ranks then read), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ---- data
    def shard_micro_batches(self, batches: list[Batch]) -> list[Batch]:
        """This rank's disjoint slice of a global step's micro-batches (see the module docstring)."""
        if not self.enabled:
            return batches
        n, w = len(batches), self.world_size
        if n % w == 0:
            per = n // w
            return batches[self.rank * per : (self.rank + 1) * per]
        rows = batches[0]["input_ids"].shape[0]
        if rows % w:
            raise ValueError(
                f"distributed training: neither grad_accum ({n}) nor batch_size ({rows}) divides by the world "
                f"size {w}; set the stage's grad_accum or batch_size to a multiple of {w}"
            )
        per = rows // w
        return [{k: v[self.rank * per : (self.rank + 1) * per] for k, v in b.items()} for b in batches]

    def padded_share(self, n: int) -> list[tuple[int, bool]]:
        """(batch index, counts) for this rank: a disjoint round-robin share of n batches, padded with
        batch 0 (not counted) so that every rank runs the same number of forwards and backwards (each is
        a sequence of FSDP collectives)."""
        if not self.enabled:
            return [(i, True) for i in range(n)]
        rounds = -(-n // self.world_size)
        out = []
        for r in range(rounds):
            i = r * self.world_size + self.rank
            out.append((i, True) if i < n else (0, False))
        return out


def context_from_env(env=None) -> DistContext:
    """The context torchrun's environment describes (nothing initialised); world size 1 without it."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"torchrun environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank) if world > 1 else torch.device("cuda")
        backend = "nccl" if world > 1 else None
    else:
        device, backend = torch.device("cpu"), ("gloo" if world > 1 else None)
    return DistContext(rank, world, local_rank, device, backend)


def init_distributed(timeout_s: float = 1800.0) -> DistContext:
    """Initialise the process group from torchrun's environment (once); world size 1 initialises nothing."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    ctx = context_from_env()
    if ctx.enabled:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            # NVLink multicast (NVLS) off, as the project's multi-GPU machines require (issue #11)
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            torch.cuda.set_device(ctx.device)
        if not dist.is_initialized():
            dist.init_process_group(ctx.backend, timeout=datetime.timedelta(seconds=timeout_s))
        global _WAIT_GROUP  # created by every rank here, at the same point: new_group is a collective
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_TIMEOUT_S))
    _CURRENT = ctx
    return ctx


def current() -> DistContext:
    """The initialised context, else world size 1 (library use without torchrun)."""
    return _CURRENT if _CURRENT is not None else DistContext()


def shutdown() -> None:
    global _CURRENT, _WAIT_GROUP
    if _CURRENT is not None and _CURRENT.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CURRENT, _WAIT_GROUP = None, None


# ------------------------------------------------------------------------------------------ model
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def shard_model(model: nn.Module, ctx: DistContext, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over a RustforgeModel: each decoder layer, then the transformer body as the root group."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    body = model.hf.model
    model.own_layer_loop = False  # FSDP2 unshards in hooks on the layer and body calls: transformers' loop makes them
    for module in model.modules():  # and all-gathers the experts' weights: no wider copies of them (moe.py)
        if hasattr(module, "lora_in_gemm_k_allowed"):
            module.lora_in_gemm_k_allowed = False
    for layer in body.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(body, mesh=mesh, reshard_after_forward=reshard_after_forward)
    unmanaged = [n for n, p in model.named_parameters() if p.requires_grad and not _is_dtensor(p)]
    if unmanaged:
        raise ValueError(f"shard_model: trainable parameters outside the sharded body would not sync: {unmanaged[:3]}")
    return model


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed._composable.fsdp import FSDPModule
    return FSDPModule


@contextlib.contextmanager
def full_weights(model: nn.Module):
    """For the duration, every FSDP-managed parameter of `model` is its whole unsharded tensor on this rank,
    so code that reads parameters outside a module's forward (the rollout engine) sees the full model.
    A collective (one all-gather per FSDP group, in module order): every rank must enter it. Nothing is
    gathered for an unsharded model. Costs the full model's memory on each rank while inside."""
    fsdp_module = _fsdp_module_type()
    groups = [m for m in model.modules() if isinstance(m, fsdp_module)]
    for module in groups:
        module.unshard()
    try:
        yield model
    finally:
        for module in groups:
            module.reshard()  # local: frees the gathered copies


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def trainable_named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of every trainable parameter; a collective: every rank must call it."""
    return {n: _full(p.detach()).cpu() for n, p in trainable_named_params(model)}


@contextlib.contextmanager
def params_in_place(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """For the duration, the named parameters are plain Parameters over `tensors` (full, unsharded), so code
    that reads module attributes (lora.save_adapter / load_adapter) sees whole tensors; restored after."""
    swapped = []
    try:
        for name, tensor in tensors.items():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            swapped.append((module, leaf, old))
        yield model
    finally:
        for module, leaf, old in reversed(swapped):
            module._parameters[leaf] = old


def load_full_into_shards(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the (sharded) trainable parameters; every rank passes the same tensors."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(trainable_named_params(model))
    with torch.no_grad():
        for name, full in tensors.items():
            p = params[name]
            if _is_dtensor(p):
                p.copy_(distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(full)


def save_adapter_full(model, lora_cfg, directory, ctx: DistContext) -> None:
    """lora.save_adapter of the whole (gathered) adapter, written by rank 0; collective."""
    from rustforge.model.lora import save_adapter

    if not ctx.enabled:
        save_adapter(model.hf, lora_cfg, directory)
        return
    full = full_trainable_state(model)
    if ctx.is_main:
        with params_in_place(model, full):
            save_adapter(model.hf, lora_cfg, directory)
    ctx.barrier()


def load_adapter_full(model, directory, ctx: DistContext) -> None:
    """lora.load_adapter into a (possibly sharded) model: every rank reads the file, keeps its shard."""
    from rustforge.model.lora import load_adapter

    if not ctx.enabled or not is_sharded(model):
        load_adapter(model.hf, directory)
        return
    full = {n: torch.zeros(tuple(p.shape), dtype=p.dtype) for n, p in trainable_named_params(model)}
    with params_in_place(model, full):
        load_adapter(model.hf, directory)
    load_full_into_shards(model, full)


# -------------------------------------------------------------------------------------- optimizer
def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded tensor gathered to a full CPU tensor: the single-process
    format (keys = parameter indices). A collective: every rank must call it."""
    sd = optimizer.state_dict()
    state = {i: {k: _full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sorted(sd["state"].items())}  # fmt: skip
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], saved: dict) -> None:
    """Load a full (single-process format) optimizer state; tensors shaped like a sharded parameter become
    that parameter's shard."""
    from torch.distributed.tensor import distribute_tensor

    state = {}
    for i, s in saved["state"].items():
        p = params[i]
        entry = {}
        for k, v in s.items():
            if _is_dtensor(p) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) and v.dim() > 0:
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            entry[k] = v
        state[i] = entry
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


class NullLogger:
    """MetricsLogger's interface doing nothing: ranks other than 0 log nothing."""

    class _Bar:
        def write(self, *_a, **_k):
            pass

    tb = None

    def __init__(self):
        self.bar = self._Bar()

    def log(self, *_a, **_k):
        pass

    def advance(self, *_a, **_k):
        pass

    def close(self):
        pass


# ---------------------------------------------------------------------------------------- stages
# What each stage still lacks under torchrun; a stage absent here runs distributed. Empty: lang_rust,
# core_agent, ipo, grpo and qat all run under FSDP2 (tests/test_distributed.py compares each with one process).
MISSING_FOR_DISTRIBUTED: dict[str, str] = {}


def check_stage_supported(stage: str, ctx: DistContext) -> None:
    """Refuse, with what is missing, a stage that would run wrong at world size > 1."""
    if ctx.enabled and stage in MISSING_FOR_DISTRIBUTED:
        raise RuntimeError(
            f"stage {stage} does not run under torchrun with world size {ctx.world_size} yet: missing "
            f"{MISSING_FOR_DISTRIBUTED[stage]}. Run it as a single process (world size 1)."
        )
