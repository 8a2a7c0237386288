"""Apply the parallel layout to a single-device `Nano3ForCausalLM`, from outside the model.

Order (torchtitan-style): context parallel (the `ContextParallel` object given to the
attention and Mamba-2 mixers) -> tensor/sequence parallel (DTensor plans, `tensor_parallel.py`)
-> the MoE balance loss's sequence gather -> expert parallel (experts split on the EP mesh, the
all-to-all dispatcher) -> FSDP2 (`fully_shard`) per block, with the routed experts sharded on
their own expert-data-parallel mesh. Nothing here replaces a method: the model is given objects
through its extension points (`nemotron.models.nano3.parallel`).

Gradient convention: like DDP, each parameter's gradient is the MEAN over data- and
context-parallel ranks (DP x CP) of the per-rank gradients (FSDP2's default for dense
parameters, sharded over DP x CP; expert parameters, which are reduced over the
expert-data-parallel mesh, are given the same divisor DP*CP). Contributions of tensor- and
expert-parallel peers to one rank's loss are summed. To weight by tokens rather than ranks,
weight each micro-batch's LM loss by `distributed.utils.token_loss_weights(...)` (not the
sequence balance term, a mean over sequences: see `train.loop.train_step`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.context_parallel import ContextParallel, apply_context_parallel
from nemotron.distributed.expert_parallel import AllToAllDispatcher
from nemotron.distributed.mesh import ParallelMesh
from nemotron.distributed.parallel_dims import (
    ParallelLayoutError,
    check_sequence_lengths,
    context_halo,
    sequence_shards,
    sequence_shards_how,
)
from nemotron.distributed.tensor_parallel import (
    SequenceGather,
    apply_tensor_parallel,
    tensor_parallel_submodules,
)
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.models.nano3.moe import MoE


def parallelize(
    model: Nano3ForCausalLM,
    mesh: ParallelMesh,
    parallel: ParallelismConfig | None = None,
    *,
    mixed_precision: bool = False,
    reshard_after_forward: bool = True,
) -> Nano3ForCausalLM:
    """Shard `model` (a `Nano3ForCausalLM`) in place for `mesh` and return it.

    The model is either materialised and identical on every rank (same seed), or built on the
    meta device: then call `model.to_empty(device=...)` and `model.reset_parameters()`, which
    is replaced here by an initialisation that gives every rank its shards of exactly the
    weights `reset_parameters()` gives a single-device model under the same seed (the model's
    `parallel_init` extension point).
    With pipeline parallelism `model` is this rank's pipeline part (`Nano3ForCausalLM(...,
    blocks=...)`, see `distributed.pipeline`); the mesh's DP/CP/TP/EP dimensions are those of
    its stage.
    `parallel`, if given, must be the config `mesh` was built from (checked).
    `mixed_precision`: bf16 parameters for compute, fp32 gradient reduction (FSDP2
    MixedPrecisionPolicy); the sharded master weights and optimizer state stay fp32."""
    dims = mesh.dims
    if parallel is not None:
        given = (
            parallel.tensor_model_parallel_size,
            parallel.expert_model_parallel_size,
            parallel.pipeline_model_parallel_size,
            parallel.context_parallel_size,
        )
        if given != (dims.tp, dims.ep, dims.pp, dims.cp):
            raise ParallelLayoutError(
                f"parallelize: config sizes (TP, EP, PP, CP) = {given} differ from the mesh's "
                f"{(dims.tp, dims.ep, dims.pp, dims.cp)}"
            )
    # the model checks (experts % EP, heads % TP, ...) also when the mesh was resolved without
    # the model config: an uneven split would otherwise surface as a collective mismatch
    dims.validate_model(model.config)
    model.parallel_init = functools.partial(init_like_single_device, cls=type(model))
    cp = None
    if dims.cp > 1:
        cp = ContextParallel(mesh.cp_mesh.get_group())
        apply_context_parallel(model, cp)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh)
    if dims.tp > 1 or cp is not None:
        # a rank holds part of every sequence: the balance loss gathers whole sequences
        gather = SequenceGather(mesh.tp_mesh if dims.tp > 1 else None, cp)
        for moe in _moe_layers(model):
            moe.sequence_gather = gather
    apply_expert_parallel(model, mesh)
    apply_fsdp(model, mesh, mixed_precision=mixed_precision, reshard_after_forward=reshard_after_forward)
    if model.backbone.embeddings is not None and (dims.tp > 1 or dims.cp > 1):
        # registered last with prepend: it runs before FSDP2's root all-gather, the first collective
        check = functools.partial(
            _check_local_sequence, tp=dims.tp, cp=dims.cp, halo=context_halo(model.config)
        )
        model.register_forward_pre_hook(check, prepend=True, with_kwargs=True)
    return model


def _check_local_sequence(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, tp: int, cp: int, halo: int
) -> None:
    """Forward pre-hook: `check_local_sequence` on the token ids a rank feeds the model."""
    input_ids = args[0] if args else kwargs["input_ids"]
    check_local_sequence(input_ids.shape[-1], tp, cp, halo)


def check_local_sequence(local: int, tp: int, cp: int, halo: int = 0) -> None:
    """The sequence length a rank holds (its context-parallel chunks of every sequence) must
    split into the layout's shards: sequence parallel cuts it over TP, context parallel holds
    two equal chunks, each at least `halo` tokens (`parallel_dims.context_halo`). Every rank
    checks before the first collective (the model's forward, a pipeline schedule's first
    exchange), so a bad length is this error rather than mismatched collectives (a gloo abort,
    an NCCL hang) or, for a short chunk, a failure inside a Mamba mixer of a later stage while
    the earlier stages wait on it."""
    key = "sequence length" if cp == 1 else f"sequence length (CP {cp} x {local} tokens per rank)"
    check_sequence_lengths(
        {key: local * cp}, sequence_shards(tp, cp), sequence_shards_how(tp, cp), cp=cp, halo=halo
    )


def _moe_layers(model: Nano3ForCausalLM) -> list[MoE]:
    return list(model.moe_layers())


def apply_expert_parallel(model: Nano3ForCausalLM, mesh: ParallelMesh) -> None:
    """Split every MoE layer's routed experts over the EP mesh (rank r keeps experts
    [r*E/EP, (r+1)*E/EP) as a DTensor Shard(0) of the global [E, ...] weights, so checkpoints
    keep the global layout) and swap in the all-to-all dispatcher."""
    if mesh.dims.ep == 1:
        return
    ep_mesh = mesh.ep_mesh
    for moe in _moe_layers(model):
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        moe.dispatcher = AllToAllDispatcher(moe.router.num_experts, ep_mesh.get_group())


def apply_fsdp(
    model: Nano3ForCausalLM, mesh: ParallelMesh, *, mixed_precision: bool, reshard_after_forward: bool = True
) -> None:
    """FSDP2 per block; routed experts on the expert-data-parallel mesh, everything else on DP."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision else None, reduce_dtype=torch.float32
    )
    dims = mesh.dims
    common: dict[str, Any] = dict(mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    for moe in _moe_layers(model):
        experts_common = common
        if _gathers_expert_forms(moe.experts):
            # FSDP2 gathers a form the experts' weights make themselves (FP8 forms,
            # train/fp8_gather.py; or BF16, train/expert_grads.py), not a BF16 copy by the
            # policy: their nominal dtype is the master weights' (float32), so their weight
            # gradients arrive as float32 tensors, summed over the step's micro-batches where they
            # are computed (`kernels.fp8.summed_weight_grads`); whether each micro-batch's
            # product is rounded to BF16 first is `train.experts_float32_grads`
            experts_common = dict(common, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        experts = fully_shard(
            moe.experts,
            mesh=mesh.edp_mesh,
            shard_placement_fn=_expert_shard_placement(dims.edp),
            **experts_common,
        )
        # Mean over data- (and context-) parallel ranks, like the dense parameters (EDP also
        # spans EP/TP peers, whose contributions belong to the same loss and are summed).
        _average_gradients_over(experts, mesh.edp_mesh, dims.dp * dims.cp)
        if dims.edp > 1 and dist.get_backend(mesh.edp_mesh.get_group()) == "gloo":
            # gloo has no PREMUL_SUM: reduce with SUM, then divide (FSDP2's own fallback; not
            # on a 1-rank mesh, where torch 2.13's FSDP2 would then divide twice)
            experts.set_force_sum_reduction_for_comms(True)
    backbone = model.backbone
    # A pipeline part past the first has no embeddings. Tied to the LM head, the embedding
    # weight is the LM head's parameter and stays with it in the root unit: FSDP2 refuses a
    # parameter managed by two units (its first forward raised ValueError).
    if backbone.embeddings is not None and not model.config.tie_word_embeddings:
        fully_shard(backbone.embeddings, mesh=mesh.dp_mesh, **common)
    if dims.tp == 1:
        for block in backbone.layers.values():
            fully_shard(block, mesh=mesh.dp_mesh, **common)
    else:
        # DTensor-parallel submodules in their own units over DP; the rest of each block (norms,
        # router, the Mamba mixer's packed and per-head parameters) is rank-local: every TP rank
        # holds it whole and contributes a partial gradient, so its unit is sharded over
        # DP x TP, whose reduce-scatter sums the TP parts (see `tensor_parallel`).
        for module in tensor_parallel_submodules(model):
            fully_shard(module, mesh=mesh.dp_mesh, **common)
        units = [*backbone.layers.values()] + ([backbone.norm_f] if backbone.norm_f is not None else [])
        for unit in units:
            _rank_local_unit(unit, mesh, common)
    # The LM head stays in the root unit: the fused loss reads `lm_head.weight` without calling
    # the module, so only the root's pre-forward hook would unshard it in time. The root is
    # not resharded after forward: its parameters are used again at the very start of backward,
    # and on torch < 2.13 FSDP2 finds no tensors in the model's dataclass output to hook a
    # re-gather on, so backward would read the freed LM-head weight (illegal memory access on
    # CUDA, seen on 2 H200s).
    fully_shard(model, mesh=mesh.dp_mesh, **dict(common, reshard_after_forward=False))
    # FSDP2 has no getter for it; `restore_reshard_after_forward` (and the loop) read it
    setattr(model, "fsdp_reshard_after_forward", reshard_after_forward)


def _gathers_expert_forms(experts: nn.Module) -> bool:
    """Whether FSDP2 gathers forms these routed experts' weights make themselves (their
    parameters wrap a `train.fp8_gather.ExpertMasterWeight`: `train.fp8.experts_fsdp_float8_all_gather`,
    or `train.experts_float32_grads`)."""
    params = list(experts.parameters(recurse=False))
    return bool(params) and all(
        getattr(p.to_local() if isinstance(p, DTensor) else p, "gathers_whole_experts", False) for p in params
    )


def _average_gradients_over(unit: FSDPModule, unit_mesh: DeviceMesh, ranks: int) -> None:
    """Have FSDP2 divide `unit`'s gradients by `ranks` (the data- and context-parallel ranks whose
    mean the loss is), not by the size of the unit's own mesh, which may hold other ranks whose
    parts are summed. A one-rank unit mesh with nothing to divide by keeps FSDP2's default: with a
    factor set, its one-rank path divides by 1 into a temporary the size of the unit's gradients
    (2.4 GiB for one of the proxy's MoE layers, the step's memory peak on one GPU), without one it
    copies them (the same values: dividing by 1 is exact)."""
    if ranks == 1 and unit_mesh.size() == 1:
        return
    unit.set_gradient_divide_factor(float(ranks))


def _rank_local_unit(module: nn.Module, mesh: ParallelMesh, common: dict[str, Any]) -> None:
    """FSDP2 over DP x TP for parameters of which every TP rank computes a partial gradient:
    summed over TP, averaged over DP x CP."""
    unit = fully_shard(module, mesh=mesh.dp_tp_mesh, **common)
    _average_gradients_over(unit, mesh.dp_tp_mesh, mesh.dims.dp * mesh.dims.cp)
    if dist.get_backend(mesh.dp_tp_mesh.get_group()) == "gloo":
        unit.set_force_sum_reduction_for_comms(True)


def restore_reshard_after_forward(model: FSDPModule) -> None:
    """Undo `model.set_reshard_after_forward(...)` on a model built by `apply_fsdp`: every unit
    back to the configured setting, the root to never (see `apply_fsdp`)."""
    model.set_reshard_after_forward(getattr(model, "fsdp_reshard_after_forward"))
    model.set_reshard_after_forward(False, recurse=False)


def _expert_shard_placement(edp: int):
    """FSDP2 shards dim 0 (experts) by default; with fewer local experts than EDP ranks that
    leaves ranks empty, so shard the first dimension that splits evenly (dim 0 if none: FSDP2
    pads uneven dim-0 shards but rejects uneven shards of other dims). Weights whose own forms
    FSDP2 gathers (`gathers_whole_experts`) shard by whole experts only: an uneven split is a
    `ParallelLayoutError` here, naming the key that turned the gathering on, before anything runs."""

    def placement(param: torch.Tensor) -> Shard:
        local = param.to_local() if isinstance(param, DTensor) else param
        shape = local.shape
        if getattr(local, "gathers_whole_experts", False):
            # forms gathered by FSDP2 (train/fp8_gather.py) are made per whole expert
            if shape[0] % edp:
                raise ParallelLayoutError(
                    f"{getattr(local, 'config_key')}: FSDP2 must shard the routed experts "
                    f"by whole experts, but {shape[0]} experts per expert-parallel rank do not divide "
                    f"over {edp} expert-data-parallel ranks; set the key to false or choose "
                    "model.expert_model_parallel_size so that they divide"
                )
            return Shard(0)
        for dim, size in enumerate(shape):
            if size % edp == 0:
                return Shard(dim)
        return Shard(0)

    return placement


# -- initialisation -----------------------------------------------------------------------------


def _owner_unit(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


@torch.no_grad()
def init_like_single_device(model: Nano3ForCausalLM, cls: type[Nano3ForCausalLM] | None = None) -> None:
    """Initialise a sharded `Nano3ForCausalLM` to exactly the weights `reset_parameters()` gives
    the single-device model under the current RNG state (what `parallelize` sets as the model's
    `parallel_init`, so `model.reset_parameters()` calls it): a meta-device twin is materialised one
    unit (embeddings, one block, ...) at a time on this rank's device, initialised in the
    same order as `Nano3ForCausalLM.reset_parameters`, and each rank keeps its shards. Peak
    extra memory: one block's full weights."""
    cls = cls or type(model)
    cfg = model.config
    # A pipeline part draws the whole model's initialisation in order and keeps its own units.
    first = next(model.parameters())
    device = first.to_local().device if isinstance(first, DTensor) else first.device
    with torch.device("meta"):
        twin = cls(cfg)
    # names without the activation-checkpoint wrapper's level (train.activation_recompute)
    real_params = {_unwrapped_name(n): p for n, p in model.named_parameters()}
    real_buffers = {_unwrapped_name(n): b for n, b in model.named_buffers()}

    def commit(prefix: str, unit: nn.Module) -> None:
        for name, param in unit.named_parameters(prefix=prefix):
            if name in real_params:  # else another pipeline stage holds it
                _copy_full_into(real_params[name], param)
        for name, buffer in unit.named_buffers(prefix=prefix):
            if name in real_buffers:
                real_buffers[name].copy_(buffer)
        unit.to_empty(device="meta")

    # Nano3ForCausalLM.reset_parameters: embeddings, LM head, then every backbone module that
    # initialises itself (plain Linear / Embedding / Conv1d are initialised by their owner).
    # the twin is the whole model
    assert twin.backbone.embeddings is not None and twin.lm_head is not None
    twin.backbone.embeddings.to_empty(device=device)
    nn.init.normal_(twin.backbone.embeddings.weight, std=cfg.init_std)
    if not cfg.tie_word_embeddings:
        twin.lm_head.to_empty(device=device)
        nn.init.normal_(twin.lm_head.weight, std=cfg.init_std)
        commit("lm_head", twin.lm_head)
    current: str | None = None
    units = dict(twin.backbone.named_modules())
    for name, module in twin.backbone.named_modules():
        if (
            not name
            or not hasattr(module, "reset_parameters")
            or isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d))
        ):
            continue
        unit = _owner_unit(name)
        if unit != current:
            if current is not None:
                commit(f"backbone.{current}", units[current])
            current = unit
            units[unit].to_empty(device=device)
        module.reset_parameters()
    if current is not None:
        commit(f"backbone.{current}", units[current])
    for unit_name in ("embeddings", "norm_f"):
        if unit_name != current and units[unit_name].weight.device.type != "meta":
            commit(f"backbone.{unit_name}", units[unit_name])
    leftover = [n for n, p in twin.named_parameters() if p.device.type != "meta"]
    if leftover:
        raise RuntimeError(f"init_like_single_device: parameters not copied: {leftover}")


def _unwrapped_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        # detached: a copy of values (a grad-requiring local tensor makes torch warn, to no use)
        replicated = DTensor.from_local(full.detach(), mesh, [Replicate()] * mesh.ndim, run_check=False)
        param.to_local().copy_(replicated.redistribute(mesh, param.placements).to_local())
    else:
        param.copy_(full)
