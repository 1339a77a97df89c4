"""Per-GPU memory of a training run, planned before anything is loaded (`tulu plan`, the Kubernetes launcher).

Pure functions over a Llama-style ``config.json`` and a training preset: parameter count, then the bytes one
process holds at its peak for parameters, gradients, optimizer state and fp32 master weights under a sharding
mode, activations with and without checkpointing, the LM head and its loss, the reference model (DPO, RLVR) and the
vLLM engine (RLVR). The sharding modes follow FSDP2 as `training/sharding` applies it: per-layer ``fully_shard``, bf16
compute with fp32 master weights and optimizer state, optional CPU offload and activation checkpointing.

What the numbers rest on (each is what the project's trainers do, not a generic rule):

- ``none`` in bf16: the trainers keep fp32 weights and train under bf16 autocast, whose weight casts live through
  forward and backward: 2 (casts) + 4 (weights) + 4 (fp32 grads) + 8 (Adam m, v) = 18 bytes/parameter.
  ``fsdp``: DeepSpeed's mixed-precision Adam accounting, 16 bytes/parameter, divided over the shards, plus the
  unsharded bf16 working set (the root's embedding and LM head, two decoder layers for prefetch).
- Activations per token and decoder layer, from the tensors autograd saves in transformers' Llama with SDPA
  attention (no ``s^2`` term): two RMSNorms (fp32 upcast, fp32 normalized, output), q/k/v after RoPE, the attention
  output and ``o_proj``'s input, the SwiGLU's gate, up, SiLU and product; under autocast each linear's bf16 input
  copy. Checkpointing keeps each layer's input and recomputes one layer at a time.
- The LM head: none of the trainers builds the full ``[tokens, vocab]`` logits. SFT runs TRL's fused head (tiles of
  4096 tokens x 32768 vocabulary entries, fp32 gradients of the hidden states and the head's weight); DPO
  (`dpo.sequence_logps`) sends only labelled tokens through the head, 1024 at a time under checkpointing; GRPO only
  completion tokens, whose fp32 log-softmax over the vocabulary it keeps. Exception: sharded with FSDP2, GRPO runs
  the model's full forward (FSDP2 gathers the head only there), so its plan adds every position's logits.
- RLVR with vLLM colocated: vLLM claims ``vllm_gpu_memory_utilization`` of the GPU for its bf16 weights and KV
  cache; a frozen reference model when ``beta > 0``.

`benchmarks/memory_plan.py` measures peak memory on CPU for the tiny and 135M models and compares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

GIB = 1024**3
CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"
Stage = Literal["sft", "dpo", "rlvr"]
STAGES: tuple[str, ...] = ("sft", "dpo", "rlvr")
DPO_LOGPROB_CHUNK_TOKENS = 1024  # dpo.LOGPROB_CHUNK_TOKENS (not imported: dpo.py imports transformers' stack)
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768  # TRL 1.16's fused LM head tile (kernels/chunked_logprob.py)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class PlanError(ValueError):
    """A model config or a plan request the planner cannot answer."""


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "model") -> ModelShape:
        """From a transformers ``config.json`` dict; `PlanError` names the missing keys and ``name``."""
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise PlanError(f"{name}: config lacks {missing}; expected a Llama-style config.json with {list(REQUIRED_KEYS)}")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(name=name, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
                   intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                   attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_parameters(self) -> int:
        shapes = self.linear_shapes()
        weights = sum(a * b for a, b in shapes.values())
        biases = (self.q_dim + 2 * self.kv_dim + self.hidden_size) * self.attention_bias
        biases += (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        return weights + biases + 2 * self.hidden_size  # + the two RMSNorm weights

    @property
    def root_parameters(self) -> int:
        """Outside the decoder layers: embedding, final norm, LM head (unless tied)."""
        embedding = self.vocab_size * self.hidden_size
        return embedding * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def parameter_count(self) -> int:
        return self.num_layers * self.layer_parameters + self.root_parameters

    def lora_parameters(self, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """Trainable parameters of rank-``r`` LoRA adapters on ``targets`` of every layer."""
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache per token (keys and values of every layer)."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


def shipped_model_configs() -> list[str]:
    """Names of the model configs under ``tulu_pipeline/models/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_shape(name_or_path: str | Path) -> ModelShape:
    """A shipped config by name (``llama-3.1-8b``), a ``config.json`` or a model directory holding one."""
    path = Path(name_or_path)
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        path, name = shipped, str(name_or_path)
    else:
        if path.is_dir():
            path = path / "config.json"
        name = str(name_or_path)
        if not path.is_file():
            raise PlanError(f"model {name_or_path!r}: neither a shipped config ({', '.join(shipped_model_configs())}) "
                            f"nor a config.json or a directory holding one")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc})") from exc
    return ModelShape.from_config(config, name)


# ---------------------------------------------------------------------------------------------
# what runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sharding:
    """How parameters and state are placed (FSDP2 as `training/sharding` applies it)."""

    strategy: Literal["none", "fsdp"] = "none"
    offload: bool = False  # fp32 master weights, gradients and optimizer state in CPU memory (fsdp only)
    activation_checkpointing: bool = False
    precision: Literal["bf16", "fp32"] = "bf16"  # compute dtype; bf16 keeps fp32 master weights and optimizer

    def __post_init__(self) -> None:
        if self.offload and self.strategy != "fsdp":
            raise PlanError("CPU offload needs strategy fsdp")


@dataclass(frozen=True)
class Workload:
    """One process's share of an optimizer step."""

    stage: Stage
    micro_batch: int  # sequences (SFT), pairs (DPO), rollouts (RLVR) per forward/backward pass
    accumulation: int
    global_batch: int  # per optimizer step, all processes
    unit: str
    seq_len: int  # tokens per sequence (RLVR: prompt + completion)
    completion_len: int = 0  # RLVR: tokens through the LM head per rollout
    reference: Literal["none", "cached", "model"] = "none"
    lora_r: int | None = None
    passes_per_step: int = 1  # RLVR: optimizer updates per batch of rollouts (num_iterations)
    vllm_memory_fraction: float | None = None  # RLVR with vLLM colocated: its share of GPU memory


def workload_for(stage: Stage, config: Any, world_size: int, preset: str | None = None,
                 micro_batch: int | None = None, reference: str | None = None,
                 lora_r: int | None = None) -> Workload:
    """The workload of ``config`` (an SFT, DPO or GRPO config) on ``world_size`` processes.

    ``micro_batch`` replaces the configured per-device batch (accumulation makes up the same global batch);
    the split is the trainers' own (`batch_layout`), so an indivisible batch raises as it would at launch.
    """
    if lora_r is not None and stage != "sft":
        raise PlanError(f"LoRA is an SFT option (SFTTrainingConfig.lora); the {stage} trainer trains full weights")
    if micro_batch is not None:
        field_name = "micro_batch_size" if stage == "rlvr" else "per_device_batch_size"
        update: dict[str, int] = {field_name: micro_batch}
        if stage != "rlvr":
            global_batch = config.global_batch_size
            if global_batch % micro_batch:
                raise PlanError(f"micro-batch {micro_batch} does not divide the global batch of {global_batch}")
            update["gradient_accumulation_steps"] = global_batch // micro_batch
        config = config.model_copy(update=update)
    layout = config.batch_layout(world_size, preset)
    if stage == "rlvr":
        return Workload(stage, layout.per_device_batch_size, layout.gradient_accumulation_steps,
                        layout.global_batch_size, layout.unit, config.max_prompt_length + config.max_completion_length,
                        completion_len=config.max_completion_length,
                        reference="model" if config.beta > 0 else "none", passes_per_step=config.num_iterations,
                        vllm_memory_fraction=config.vllm_gpu_memory_utilization if config.use_vllm else None)
    if stage == "sft":
        r = lora_r if lora_r is not None else (config.lora.r if config.lora is not None else None)
        return Workload(stage, layout.per_device_batch_size, layout.gradient_accumulation_steps,
                        layout.global_batch_size, layout.unit, config.max_length, lora_r=r)
    # run_dpo reads cached reference log-probs (the reference_logprobs asset) and never loads the reference
    return Workload(stage, layout.per_device_batch_size, layout.gradient_accumulation_steps, layout.global_batch_size,
                    layout.unit, config.max_length, reference=reference or "cached")


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int
    gpu_memory_gb: float  # per GPU, GiB as nvidia-smi and the "80 GB" mean it
    nodes: int = 1
    peak_tflops: float = 989.0  # dense bf16 of an H100 SXM
    mfu: float = 0.4
    runtime_overhead_gib: float = 1.0  # CUDA context, NCCL buffers, allocator slack; 0 for a CPU measurement
    accelerator: Literal["cuda", "cpu"] = "cuda"  # cpu: TRL's fused LM head runs its torch fallback

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class MemoryPlan:
    """Per-GPU bytes at the peak of a step, and what the step costs."""

    model: str
    stage: str
    parameter_count: int
    trainable_parameters: int
    sharding: Sharding
    workload: Workload
    hardware: Hardware
    components: dict[str, int]  # bytes per GPU that add up to the peak
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    cpu_offloaded_bytes: int
    tokens_per_step: int
    step_flops: float
    kv_cache_needed: int = 0  # RLVR: KV cache for every rollout of this GPU at full length
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def capacity_bytes(self) -> int:
        return int(self.hardware.gpu_memory_gb * GIB)

    @property
    def within_memory(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def step_seconds(self) -> float:
        hw = self.hardware
        return self.step_flops / (hw.world_size * hw.peak_tflops * 1e12 * hw.mfu)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "stage": self.stage, "fits": fits(self),
            "parameter_count": self.parameter_count, "trainable_parameters": self.trainable_parameters,
            "sharding": asdict(self.sharding), "workload": asdict(self.workload), "hardware": asdict(self.hardware),
            "per_gpu_gib": {name: round(b / GIB, 3) for name, b in self.components.items()},
            "total_gib": round(self.total_bytes / GIB, 3), "gpu_memory_gib": self.hardware.gpu_memory_gb,
            "activations_gib": {"without_checkpointing": round(self.activations_without_checkpointing / GIB, 3),
                                "with_checkpointing": round(self.activations_with_checkpointing / GIB, 3)},
            "cpu_offloaded_gib": round(self.cpu_offloaded_bytes / GIB, 3),
            "kv_cache_needed_gib": round(self.kv_cache_needed / GIB, 3),
            "tokens_per_step": self.tokens_per_step, "step_flops": self.step_flops,
            "estimated_step_seconds": round(self.step_seconds, 3), "suggestions": list(self.suggestions),
        }


def layer_activation_bytes(shape: ModelShape, tokens: int, sharding: Sharding) -> int:
    """Bytes autograd saves in one decoder layer for ``tokens`` tokens (see the module docstring)."""
    h, kv, i = shape.hidden_size, shape.kv_dim, shape.intermediate_size
    compute = 2 if sharding.precision == "bf16" else 4
    # The residual stream's dtype: fp32 weights under autocast keep it fp32; FSDP's bf16 params make it bf16.
    residual = 2 if sharding.precision == "bf16" and sharding.strategy == "fsdp" else 4
    norms = 2 * h * (4 + 4 + residual)
    casts = (3 + 2) * h * compute if compute != residual else 0  # q/k/v and gate/up inputs cast by autocast
    attention = (2 * shape.q_dim + h + 2 * kv) * compute  # q, k, v after RoPE, SDPA output, o_proj input
    mlp = 4 * i * compute  # gate, up, SiLU(gate), their product
    return tokens * (norms + casts + attention + mlp)


def activation_bytes(shape: ModelShape, tokens: int, sharding: Sharding, checkpointing: bool) -> int:
    """Decoder activations of one micro-batch, without the logits."""
    residual = 2 if sharding.precision == "bf16" and sharding.strategy == "fsdp" else 4
    layer = layer_activation_bytes(shape, tokens, sharding)
    edges = tokens * shape.hidden_size * (residual + 4 + 4 + residual)  # embedding output, final norm
    if checkpointing:  # each layer's input, and one layer recomputed in backward
        return shape.num_layers * tokens * shape.hidden_size * residual + layer + edges
    return shape.num_layers * layer + edges


def lm_head_bytes(shape: ModelShape, workload: Workload, sharding: Sharding, hardware: Hardware) -> int:
    """The LM head's logits and the loss's working memory at their peak (see the module docstring)."""
    compute = 2 if sharding.precision == "bf16" else 4
    vocab, hidden = shape.vocab_size, shape.hidden_size
    tokens = workload.micro_batch * workload.seq_len
    if workload.stage == "sft":
        # TRL's fused head: fp32 gradients of the hidden states and of the head's weight, one [4096, 32768] logits
        # tile; on CPU its torch fallback (`_backward_tile`) holds eight fp32 tiles at once (y, z, log_p, p, grad and
        # three temporaries of the target term), Triton none.
        tile = min(tokens, FUSED_HEAD_TOKENS) * min(vocab, FUSED_HEAD_VOCAB)
        return 4 * tokens * hidden + 4 * vocab * hidden + tile * (compute + (32 if hardware.accelerator == "cpu" else 0))
    if workload.stage == "dpo":
        # the labelled positions' hidden states gathered; in backward one checkpointed chunk's fp32 logits are
        # recomputed and held with the gather's dense gradient, logsumexp's gradient and their sum
        tokens *= 2
        return tokens * hidden * compute + min(tokens, DPO_LOGPROB_CHUNK_TOKENS) * vocab * 16
    # GRPO: completion positions only: logits, fp32 upcast, temperature scaling, log-softmax, entropy's exp
    picked = workload.micro_batch * workload.completion_len * vocab * (compute + 16)
    if sharding.strategy == "fsdp":
        # sharded, `rlvr_step.completion_logprobs` runs the root module's full forward (FSDP2 gathers the head only
        # there): every position's logits are computed before the completion positions are picked
        return picked + tokens * vocab * compute
    return picked


def plan_memory(shape: ModelShape, workload: Workload, sharding: Sharding, hardware: Hardware) -> MemoryPlan:
    """The per-GPU peak of ``workload`` on ``hardware`` under ``sharding``."""
    p = shape.parameter_count
    shards = hardware.world_size if sharding.strategy == "fsdp" else 1
    bf16 = sharding.precision == "bf16"
    lora = workload.lora_r is not None
    trainable = shape.lora_parameters(workload.lora_r) if lora else p
    working = 2 * (shape.root_parameters + 2 * shape.layer_parameters)  # fsdp: gathered bf16 root + two layers

    components: dict[str, int] = {}
    offloaded = 0
    if sharding.strategy == "none":
        components["parameters"] = (2 * p if bf16 else 4 * p) + (4 * trainable if lora and not bf16 else 0)
        components["master_weights"] = 4 * p if bf16 else 0  # fp32 weights (frozen ones too, as loaded)
    else:
        components["parameters"] = min(working, 2 * p) if bf16 else 4 * p // shards + 2 * working
        state = (4 * p if not lora else 2 * p + 4 * trainable) // shards if bf16 else 0
        components["master_weights"] = state
    grads = 4 * trainable // shards
    optimizer = 8 * trainable // shards
    if sharding.strategy == "fsdp" and bf16:
        grads += 2 * shape.layer_parameters  # one layer's unsharded bf16 gradient before its reduce-scatter
    if sharding.offload:
        offloaded = components["master_weights"] + grads + optimizer
        components["master_weights"], grads, optimizer = 0, 2 * shape.layer_parameters, 0
    components["gradients"] = grads
    components["optimizer"] = optimizer

    tokens = workload.micro_batch * workload.seq_len * (2 if workload.stage == "dpo" else 1)
    with_ckpt = activation_bytes(shape, tokens, sharding, True)
    without_ckpt = activation_bytes(shape, tokens, sharding, False)
    components["activations"] = with_ckpt if sharding.activation_checkpointing else without_ckpt
    components["lm_head_and_loss"] = lm_head_bytes(shape, workload, sharding, hardware)

    if workload.reference == "model":  # frozen: bf16 shards under fsdp; the trainers load fp32 otherwise
        components["reference_model"] = 2 * p // shards + working if sharding.strategy == "fsdp" else 4 * p

    kv_needed = 0
    if workload.vllm_memory_fraction is not None:
        # vLLM (tensor parallel 1, colocated) claims this fraction of the GPU for its bf16 weights and KV cache
        claim = int(workload.vllm_memory_fraction * hardware.gpu_memory_gb * GIB)
        components["vllm_weights"] = 2 * p
        components["vllm_kv_cache"] = max(0, claim - 2 * p)
        rollouts_here = workload.global_batch // hardware.world_size or 1
        kv_needed = rollouts_here * workload.seq_len * shape.kv_bytes_per_token()
    components["runtime_overhead"] = int(hardware.runtime_overhead_gib * GIB)

    # 6 FLOPs per parameter and token for a training pass (2 forward, 4 backward), causal attention on top;
    # a frozen reference adds a forward; checkpointing adds a forward; GRPO generates first (2 per token).
    per_token = 6 * p + 6 * shape.num_layers * workload.seq_len * shape.q_dim
    if sharding.activation_checkpointing:
        per_token += 2 * p
    step_tokens = workload.global_batch * workload.seq_len * (2 if workload.stage == "dpo" else 1)
    flops = per_token * step_tokens * workload.passes_per_step
    if workload.reference == "model":
        flops += 2 * p * step_tokens
    if workload.stage == "rlvr":
        flops += 2 * p * workload.global_batch * workload.completion_len
    return MemoryPlan(shape.name, workload.stage, p, trainable, sharding, workload, hardware, components,
                      without_ckpt, with_ckpt, offloaded, step_tokens, float(flops), kv_needed)


def refusal(plan: MemoryPlan) -> list[str]:
    """Why ``plan`` does not fit, beyond the total: a vLLM share too small for its own weights."""
    reasons = []
    if plan.workload.vllm_memory_fraction is not None and plan.components["vllm_kv_cache"] == 0:
        reasons.append(f"vLLM's share ({plan.workload.vllm_memory_fraction:.2f} of {plan.hardware.gpu_memory_gb:g} "
                       f"GiB) does not hold its {plan.components['vllm_weights'] / GIB:.1f} GiB of bf16 weights; "
                       f"raise vllm_gpu_memory_utilization")
    return reasons


# ---------------------------------------------------------------------------------------------
# what would fit instead
# ---------------------------------------------------------------------------------------------
def _micro_batches(workload: Workload, world_size: int) -> list[int]:
    """Micro-batches below the current one that still split the global batch evenly, largest first."""
    share = max(1, workload.global_batch // world_size)
    return [m for m in range(workload.micro_batch - 1, 0, -1) if workload.stage == "rlvr" or share % m == 0]


def _fitting(shape: ModelShape, workload: Workload, sharding: Sharding, hardware: Hardware) -> MemoryPlan | None:
    """The plan at the largest micro-batch (current first) that fits, or None."""
    for micro in [workload.micro_batch, *_micro_batches(workload, hardware.world_size)]:
        candidate = replace(workload, micro_batch=micro,
                            accumulation=max(1, workload.global_batch // hardware.world_size // micro))
        plan = plan_memory(shape, candidate, sharding, hardware)
        if fits(plan):
            return plan
    return None


def _describe(plan: MemoryPlan, change: str) -> str:
    return f"{change} at micro-batch {plan.workload.micro_batch}: {plan.total_bytes / GIB:.1f} GiB per GPU"


def suggest(shape: ModelShape, plan: MemoryPlan) -> list[str]:
    """Changes that would make ``plan`` fit, each with the micro-batch it needs: a smaller micro-batch,
    activation checkpointing (SFT, DPO), FSDP over more GPUs, CPU offload, LoRA (SFT, whose config has it)."""
    hw, sharding, workload = plan.hardware, plan.sharding, plan.workload
    found: list[str] = []
    smaller = _fitting(shape, workload, sharding, hw)
    if smaller is not None and smaller.workload.micro_batch < workload.micro_batch:
        found.append(_describe(smaller, "a smaller micro-batch (--micro-batch)"))
    if not sharding.activation_checkpointing and workload.stage != "rlvr":  # GRPO's trainer has no such option
        candidate = _fitting(shape, workload, replace(sharding, activation_checkpointing=True), hw)
        if candidate is not None:
            found.append(_describe(candidate, "activation checkpointing (--checkpointing)"))
    fsdp = replace(sharding, strategy="fsdp")
    for gpus in (2, 4, 8, 16, 32, 64, 128, 256):
        if gpus <= hw.world_size and sharding.strategy == "fsdp":
            continue
        nodes = max(1, gpus // 8)
        more = replace(hw, gpus_per_node=gpus // nodes, nodes=nodes)
        if workload.global_batch % gpus:  # the trainers refuse a batch the world size does not divide
            continue
        candidate = _fitting(shape, workload, fsdp, more)
        if candidate is not None:
            where = f"{gpus} GPUs" if nodes == 1 else f"{nodes} nodes x 8 GPUs"
            found.append(_describe(candidate, f"FSDP over {where} (--gpus {gpus // nodes} --nodes {nodes} "
                                              f"--sharding fsdp)"))
            break
    candidate = _fitting(shape, workload, replace(fsdp, offload=True), hw)
    if candidate is not None:
        found.append(_describe(candidate, f"FSDP with CPU offload on {hw.world_size} GPU(s) (--sharding fsdp "
                                          f"--offload; {candidate.cpu_offloaded_bytes / GIB:.0f} GiB of CPU memory "
                                          f"per GPU)"))
    if workload.stage == "sft" and workload.lora_r is None:
        candidate = _fitting(shape, replace(workload, lora_r=16), sharding, hw)
        if candidate is not None:
            found.append(_describe(candidate, "LoRA r=16 instead of full fine-tuning (--lora 16)"))
    return found


def refusal_message(plan: MemoryPlan) -> str:
    """What does not fit and what would (``plan.suggestions``)."""
    head = (f"{plan.model} {plan.stage} does not fit: {plan.total_bytes / GIB:.1f} GiB per GPU planned, "
            f"{plan.hardware.gpu_memory_gb:g} GiB available on each of {plan.hardware.world_size} GPU(s) "
            f"(largest part: {max(plan.components, key=plan.components.__getitem__)}, "
            f"{max(plan.components.values()) / GIB:.1f} GiB)")
    lines = [head, *(f"  {reason}" for reason in refusal(plan))]
    if plan.suggestions:
        lines.append("what would fit:")
        lines.extend(f"  - {s}" for s in plan.suggestions)
    else:
        lines.append("nothing tried fits (a smaller micro-batch, checkpointing, more GPUs, CPU offload, LoRA); "
                     "shorten max_length or use a smaller model")
    return "\n".join(lines)


def plan_run(model: str | Path, stage: Stage, config: Any, *, gpus: int, gpu_memory_gb: float, nodes: int = 1,
             preset: str | None = None, strategy: str | None = None, offload: bool = False,
             checkpointing: bool | None = None, precision: str = "bf16", micro_batch: int | None = None,
             lora_r: int | None = None, reference: str | None = None, mfu: float = 0.4,
             peak_tflops: float = 989.0, runtime_overhead_gib: float = 1.0) -> MemoryPlan:
    """The plan of ``config`` (a stage's training config) for ``model`` on ``nodes`` x ``gpus``; suggestions
    filled in when it does not fit. Defaults: FSDP when there is more than one GPU, checkpointing as configured."""
    if stage not in STAGES:
        raise PlanError(f"stage must be one of {STAGES}, got {stage!r}")
    shape = model if isinstance(model, ModelShape) else load_model_shape(model)
    hardware = Hardware(gpus, gpu_memory_gb, nodes, peak_tflops, mfu, runtime_overhead_gib)
    if checkpointing is None:
        checkpointing = bool(getattr(config, "gradient_checkpointing", False))
    sharding = Sharding(strategy or ("fsdp" if hardware.world_size > 1 or offload else "none"), offload,
                        checkpointing, precision)
    workload = workload_for(stage, config, hardware.world_size, preset, micro_batch, reference, lora_r)
    plan = plan_memory(shape, workload, sharding, hardware)
    if not fits(plan):
        plan.suggestions = suggest(shape, plan)
    return plan


def fits(plan: MemoryPlan) -> bool:
    """Whether ``plan`` fits in memory and every part of it can work (vLLM's share holds its weights)."""
    return plan.within_memory and not refusal(plan)


def plan_table(plan: MemoryPlan) -> str:
    """A readable table of ``plan``."""
    w, hw, s = plan.workload, plan.hardware, plan.sharding
    lines = [
        f"{plan.model}: {plan.parameter_count / 1e9:.3f}B parameters ({plan.trainable_parameters / 1e9:.3f}B trained), "
        f"{plan.stage} on {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {hw.gpu_memory_gb:g} GiB",
        f"sharding {s.strategy}{' + CPU offload' if s.offload else ''}, {s.precision}, activation checkpointing "
        f"{'on' if s.activation_checkpointing else 'off'}; micro-batch {w.micro_batch} {w.unit} x {w.seq_len} tokens, "
        f"{w.accumulation} accumulation step(s), global batch {w.global_batch} {w.unit}",
        "",
        f"{'per GPU':24} {'GiB':>9}",
    ]
    for name, value in plan.components.items():
        lines.append(f"{name:24} {value / GIB:9.2f}")
    lines.append(f"{'total':24} {plan.total_bytes / GIB:9.2f}   of {hw.gpu_memory_gb:g}")
    lines.append("")
    lines.append(f"activations: {plan.activations_without_checkpointing / GIB:.2f} GiB without checkpointing, "
                 f"{plan.activations_with_checkpointing / GIB:.2f} GiB with")
    if plan.cpu_offloaded_bytes:
        lines.append(f"offloaded to CPU memory: {plan.cpu_offloaded_bytes / GIB:.1f} GiB per GPU")
    if plan.kv_cache_needed:
        lines.append(f"KV cache for this GPU's rollouts at full length: {plan.kv_cache_needed / GIB:.1f} GiB "
                     f"(vLLM schedules them in its {plan.components['vllm_kv_cache'] / GIB:.1f} GiB)")
    lines.append(f"tokens per optimizer step: {plan.tokens_per_step:,}; estimated step time "
                 f"{plan.step_seconds:.1f} s at {hw.mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s per GPU")
    lines.append("fits" if fits(plan) else "DOES NOT FIT")
    return "\n".join(lines)

