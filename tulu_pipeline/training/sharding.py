"""Sharded training for SFT, DPO and the GRPO learner: FSDP2, sharded checkpoints, one consolidated export.

What a trainer calls, in order (docs/sharding.md):

1. `init_data_parallel` — the process group from torchrun's environment (gloo on CPU, nccl on CUDA) and a 1-D
   device mesh; a plain process (no torchrun) is world size 1 without a process group.
2. `shard_model` (or `apply_sharding` with a `ShardingConfig`) — activation checkpointing, then
   ``fully_shard`` on every decoder layer and on the root, with bf16 compute over fp32 master weights and an
   optional CPU offload. Build the optimizer *after* this, on the sharded parameters, so its state is sharded too.
3. `save_sharded_checkpoint` / `latest_checkpoint` / `load_sharded_checkpoint` — model and optimizer through
   ``torch.distributed.checkpoint`` (each rank writes its own shards), the step, the caller's extra state (e.g.
   the lr scheduler) and every rank's RNG state. Written into ``step-<n>.partial`` and renamed to ``step-<n>`` by
   rank 0 after every rank has finished, so a checkpoint cut short (kill -9) is never resumed from.
4. `export_consolidated` — the full state dict gathered to rank 0 and saved with ``save_pretrained`` (safetensors)
   as the unsharded model class, which ``AutoModelForCausalLM.from_pretrained`` and vLLM load.

SFT and DPO do not call 1-3 themselves: they shard through the transformers Trainer's own FSDP2 integration
(`trainer_fsdp_arguments`, `keep_fp32_gradient_reduction`), report what each rank held (`shard_report`) and publish
the `gather_unsharded` model (docs/sharding.md, "How the trainers use it"). The GRPO learner (`training.rlvr`), which
has no Trainer, calls 1-3 itself, `reshard` after its forwards without backward, and publishes `gather_unsharded`.

This module needs torch (and transformers for the export) only: no pydantic, so the GPU benchmark
(benchmarks/gpu_sharded.py) runs it on a bare image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tulu_pipeline.training.sharding_config import ShardingConfig

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra_state.pt"
MIXED_PRECISION = ("bf16", "fp32")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the run: rank, world size, device and the mesh FSDP shards over (None unsharded)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def init_data_parallel(device: str | None = None) -> DataParallel:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    ``device``: "cuda" or "cpu"; by default CUDA when available. CUDA uses nccl and ``cuda:<LOCAL_RANK>``, CPU uses
    gloo. Without torchrun's variables the process is world size 1 and no group is created (unsharded runs only).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if "WORLD_SIZE" not in os.environ:
        return DataParallel(0, 1, 0, torch.device(kind), None)
    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    mesh = init_device_mesh(kind, (world,))
    return DataParallel(rank, world, local, torch.device(kind, local) if kind == "cuda" else torch.device("cpu"),
                        mesh)


def close_data_parallel() -> None:
    if distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: modules whose class transformers lists in ``_no_split_modules`` (what
    accelerate's FSDP auto-wrap uses), e.g. every ``LlamaDecoderLayer``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (its _no_split_modules is "
                         f"{sorted(names) or 'empty'}); FSDP needs one unit per repeated block")
    return layers


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in the backward pass (transformers' non-reentrant checkpointing, which composes
    with FSDP2's hooks: the recomputation all-gathers the layer again)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation (gradient) checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def shard_model(model: Any, dp: DataParallel, *, mixed_precision: str = "bf16", activation_checkpointing: bool = False,
                cpu_offload: bool = False) -> Any:
    """FSDP2 in place: ``fully_shard`` on every decoder layer, then on the root (embeddings, final norm, head).

    ``mixed_precision="bf16"``: parameters are all-gathered and layers compute in bf16, while the sharded master
    parameters, the gradient reduce-scatter and hence the optimizer state stay fp32. ``cpu_offload`` keeps the
    sharded parameters and gradients in host memory (the optimizer step then runs on the CPU). Returns the model.
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if dp.mesh is None:
        raise ValueError("shard_model needs a process group: launch with torchrun (init_data_parallel found no "
                         "WORLD_SIZE in the environment)")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"master weights must be fp32 (load the model with dtype=torch.float32), got "
                         f"{next(model.parameters()).dtype}")
    options: dict[str, Any] = {
        "mesh": dp.mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16" else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=dp.device.type == "cuda") if cpu_offload else OffloadPolicy(),
    }
    if not cpu_offload:
        model.to(dp.device)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def apply_sharding(model: Any, config: ShardingConfig, dp: DataParallel) -> Any:
    """`shard_model` as ``config`` says; with ``strategy="none"`` the model is only moved to the device (and
    checkpointed per layer when asked)."""
    if config.strategy == "none":
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        return model.to(dp.device)
    return shard_model(model, dp, mixed_precision=config.mixed_precision,
                       activation_checkpointing=config.activation_checkpointing, cpu_offload=config.cpu_offload)


def reshard(model: Any) -> None:
    """Put an FSDP2 model's root unit back in its sharded state after forwards without a backward (generation,
    frozen log-probs); a no-op on other models.

    FSDP2 does not reshard the root after its forward (a backward usually follows at once), so after a forward under
    ``no_grad`` the root's unsharded tensors stay registered as the module's parameters: an optimizer built then
    would hold them instead of the sharded ones, and ``get_state_dict`` would not find its parameters."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_numel(model: Any) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model) over the parameters."""
    params = list(model.parameters())
    return sum(_local(p).numel() for p in params), sum(p.numel() for p in params)


def optimizer_local_numel(optimizer: Any) -> tuple[int, int]:
    """(elements this rank holds, elements in total) over the optimizer's per-parameter state tensors (Adam's two
    moments; scalar step counters are left out)."""
    local = total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "numel") and value.dim() > 0:
                local += _local(value).numel()
                total += value.numel()
    return local, total


def clip_grad_norm(model: Any, max_norm: float) -> float:
    """Clip the gradients' global norm (over every shard) to ``max_norm``; returns the norm before clipping."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------------------------------------
# sharded checkpoints (resume)
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_steps(root: str | os.PathLike[str]) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (``step-<n>``; ``.partial`` ones are not counted), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir())


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    steps = checkpoint_steps(root)
    return Path(root) / f"step-{steps[-1]}" if steps else None


def save_sharded_checkpoint(root: str | os.PathLike[str], step: int, model: Any, optimizer: Any, dp: DataParallel,
                            extra: dict[str, Any] | None = None, keep: int = 2,
                            on_written: Callable[[], None] | None = None) -> Path:
    """Save model, optimizer (sharded, through DCP), ``extra`` (rank 0's, e.g. the scheduler's state_dict) and every
    rank's RNG state as ``<root>/step-<step>``; every rank must call it. Keeps the newest ``keep`` checkpoints.

    ``on_written`` runs on every rank once its files are written and before the commit (the rename): the point at
    which a crash leaves only a ``.partial`` directory behind (tests kill a rank there).
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final, partial = root / f"step-{step}", root / f"step-{step}{PARTIAL_SUFFIX}"
    if dp.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(partial))
    torch.save(_rng_state(), partial / f"rng-rank{dp.rank}.pt")
    if dp.is_main:
        torch.save(extra or {}, partial / EXTRA_FILE)
        (partial / STATE_FILE).write_text(json.dumps({"step": step, "world_size": dp.world_size}) + "\n")
    if on_written is not None:
        on_written()
    barrier()
    if dp.is_main:
        _fsync_dir(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        _fsync_dir(root)
        for old in checkpoint_steps(root)[:-keep]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    barrier()
    return final


def remove_partial_checkpoints(root: str | os.PathLike[str], dp: DataParallel) -> list[str]:
    """Rank 0 deletes the ``.partial`` leftovers of a crashed save; returns their names (every rank calls it)."""
    root = Path(root)
    removed = []
    if dp.is_main and root.is_dir():
        for path in sorted(root.glob(f"*{PARTIAL_SUFFIX}")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    barrier()
    return removed


def load_sharded_checkpoint(path: str | os.PathLike[str], model: Any, optimizer: Any,
                            dp: DataParallel) -> tuple[int, dict[str, Any]]:
    """Restore model and optimizer in place from a `save_sharded_checkpoint` directory (any world size: DCP
    reshards), and this rank's RNG state when the world size is the one that saved it. Returns (step, extra)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{path}: not a complete sharded checkpoint ({STATE_FILE} missing)")
    saved = json.loads(state_file.read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if saved["world_size"] == dp.world_size:
        # weights_only=False: the RNG states hold Python tuples and numpy arrays; the file is this run's own.
        _set_rng_state(torch.load(path / f"rng-rank{dp.rank}.pt", weights_only=False))
    extra = torch.load(path / EXTRA_FILE, weights_only=False)
    return int(saved["step"]), extra


# ---------------------------------------------------------------------------------------------
# consolidated export (publication)
# ---------------------------------------------------------------------------------------------
def unsharded_class(model: Any) -> type:
    """The model's own class: FSDP2 swaps in a subclass (``FSDPLlamaForCausalLM``), whose name must not end up in
    the exported config's ``architectures`` (vLLM picks its implementation by that name)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def full_state_dict(model: Any) -> dict[str, Any]:
    """Every parameter and persistent buffer, unsharded, on the CPU of rank 0 (other ranks get an empty dict);
    a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not distributed():
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_unsharded(model: Any) -> Any | None:
    """The model as its own (unsharded) class holding the gathered fp32 weights, on rank 0's CPU; None on the other
    ranks. A collective: every rank must call it."""
    import torch

    state = full_state_dict(model)
    if distributed():
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return None
    with torch.device("meta"):
        plain = unsharded_class(model)(model.config)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()  # assign=True replaced the tied head by its own copy; tie it back to the embeddings
    missing = [name for name, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered state dict of {type(plain).__name__} lacks {missing[:5]}")
    plain.generation_config = model.generation_config
    return plain


def export_consolidated(model: Any, tokenizer: Any | None, out: str | os.PathLike[str],
                        dp: DataParallel) -> Path | None:
    """Publish the model as one ordinary checkpoint directory (safetensors, config, tokenizer) at ``out``.

    Every rank calls it (the gather is collective); rank 0 saves the `gather_unsharded` model into
    ``<out>.partial`` and renames it into place. Returns ``out`` on rank 0.
    """
    from tulu_pipeline.storage import swap_directory

    plain = gather_unsharded(model)
    out = Path(out)
    if dp.is_main:
        partial = out.with_name(out.name + PARTIAL_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)
        plain.save_pretrained(partial, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        swap_directory(partial, out)
    barrier()
    return out if dp.is_main else None


# ---------------------------------------------------------------------------------------------
# the transformers Trainer's own FSDP2 (SFT, DPO)
# ---------------------------------------------------------------------------------------------
def trainer_fsdp_arguments(config: ShardingConfig, model: Any, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """``TrainingArguments`` fields that make the Trainer shard ``model`` with FSDP2 through accelerate: one unit per
    decoder layer, resharded after forward, sharded (DCP) resume checkpoints, FSDP's own activation checkpointing
    (``config.activation_checkpointing`` or the method's ``gradient_checkpointing``) and optional CPU offload.
    ``{}`` for ``strategy="none"``. Pair with `keep_fp32_gradient_reduction` once the arguments exist."""
    if config.strategy != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": sorted({type(layer).__name__ for layer in decoder_layers(model)}),
            "reshard_after_forward": True,
            # every rank loads the checkpoint itself: rank-0 loading plus broadcast pays off only on models
            # whose full copy does not fit each host's memory several times
            "cpu_ram_efficient_loading": False,
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": config.activation_checkpointing or gradient_checkpointing,
            "cpu_offload": config.cpu_offload,
        },
        # the per-layer recomputation is FSDP's (above); the Trainer's own would all-gather each layer twice
        "activation_checkpointing": False,
    }


def keep_fp32_gradient_reduction(args: Any) -> None:
    """With bf16, accelerate's FSDP2 default reduces gradients in bf16 too; set its plugin's policy to bf16 compute
    with an fp32 reduce-scatter, so master weights, gradients and optimizer state stay fp32 (`shard_model`'s)."""
    import torch

    if getattr(args, "fsdp_plugin_args", None) is not None and args.bf16:
        args.fsdp_plugin_args["mixed_precision_policy"] = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}


def shard_report(model: Any, optimizer: Any) -> dict[str, Any]:
    """What each rank holds of the parameters and of the optimizer state, against the totals (for the manifest).
    A collective under torchrun: every rank must call it."""
    params_local, params_total = local_numel(model)
    optim_local, optim_total = optimizer_local_numel(getattr(optimizer, "optimizer", optimizer))
    per_rank = [(params_local, optim_local)]
    if distributed():
        import torch.distributed as dist

        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (params_local, optim_local))
    return {
        "param_numel": params_total,
        "param_local_numel": [p for p, _ in per_rank],
        "param_share": [round(p / params_total, 6) for p, _ in per_rank],
        "optimizer_state_numel": optim_total,
        "optimizer_state_local_numel": [o for _, o in per_rank],
        "optimizer_state_share": [round(o / optim_total, 6) if optim_total else None for _, o in per_rank],
    }
