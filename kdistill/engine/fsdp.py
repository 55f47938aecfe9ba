"""FSDP2 training (``train.distributed.kind: fsdp2``): the student side sharded through Accelerate, the frozen
teacher sharded with the same settings (or whole on every process, or a cache), checkpoints sharded with
`torch.distributed.checkpoint`, and the trained weights gathered back into the caller's plain models.

How a step runs sharded:

* The engine trains *sharded copies*: `FSDPRun.prepare` deep-copies the objective's side, shards it (one FSDP unit
  per layer class, the rest of the side in the root unit) and hands it with its optimizer to Accelerate, which
  applies activation checkpointing, mixed precision and `fully_shard`. The caller's models stay plain (and where
  the caller put them, usually the CPU); `sync` and `finish` gather the trained weights into them.
* The chunked token loss needs the output head's full weight ``(V, H)``. The head belongs to the root unit, whose
  parameters FSDP2 all-gathers in the root's pre-forward hook, and the side computes its loss terms inside its own
  forward: there the head weight is the unsharded parameter, and its gradient goes through FSDP's
  reduce-scatter like any other (`check_head` refuses a head sharded as its own unit).
* A sharded teacher runs inside `_TeacherRun`, a root unit around the teacher's own ``outputs``; outputs that
  alias gathered weights (the head weight a live LM teacher hands to the loss) are cloned before the root unit
  is resharded.
* Checkpoints: each process writes its shards of the model and optimizer state (``sharded/`` of a checkpoint
  folder, `torch.distributed.checkpoint`); resuming with another process count re-shards them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdistill.errors import ConfigError, WiringError
from kdistill.train_config import DistributedConfig, TrainConfig

__all__ = ["FSDPRun", "check_launch", "fsdp_settings", "make_fsdp_accelerator"]

_WHERE = "train.distributed"
LAUNCH_FIX = ("launch with `accelerate launch --num_processes N` or `torchrun --nproc-per-node N` (N >= 2), or "
              "remove train.distributed for one process")


def fsdp_settings(cfg: TrainConfig) -> Optional[DistributedConfig]:
    """The FSDP2 settings of a stage, or None when it does not shard; FSDP2 without a launcher is an error."""
    dist = cfg.distributed
    if dist is None or dist.kind != "fsdp2":
        return None
    check_launch(dist)
    return dist


def check_launch(dist: DistributedConfig) -> None:
    """FSDP2 needs several processes started by a launcher: one clear line otherwise."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) < 2:
        got = "WORLD_SIZE is unset" if world is None else f"WORLD_SIZE is {world}"
        raise ConfigError(f"train.distributed.kind is fsdp2 but this is a single process ({got})",
                          where=f"{_WHERE}.kind", fix=LAUNCH_FIX)


def make_fsdp_accelerator(dist: DistributedConfig, **options):
    """An Accelerator whose `prepare` shards with FSDP2. Without a GPU, Accelerate would pick DDP over gloo for a
    multi-process CPU run: the FSDP2 plugin is then installed on its state (PyTorch's FSDP2 runs on gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dist.mixed_precision == "bf16" else MixedPrecisionPolicy()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=dist.reshard_after_forward, auto_wrap_policy="transformer_based_wrap",
        mixed_precision_policy=policy, activation_checkpointing=dist.activation_checkpointing,
        state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
    cpu = not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, fsdp_plugin=plugin, **options)
    if cpu:
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def layer_classes(model: nn.Module, dist: DistributedConfig, role: str) -> list[str]:
    """The class names sharded one unit each in `model`: ``layer_classes`` or the model's ``_no_split_modules``
    (the decoder / encoder layer of a Hugging Face model). A name no module has, or no name at all, is an error."""
    present = {type(m).__name__ for m in model.modules()}
    if dist.layer_classes is not None:
        names = list(dist.layer_classes)
        missing = [n for n in names if n not in present]
        if missing and role == "student":
            raise ConfigError(f"the student has no module of class {', '.join(missing)}",
                              where=f"{_WHERE}.layer_classes",
                              fix=f"name the class of its repeated layers (it has: {', '.join(sorted(present)[:12])})")
        names = [n for n in names if n in present]
    else:
        found = [m for m in model.modules() if getattr(m, "_no_split_modules", None)]
        names = [n for n in (found[0]._no_split_modules if found else []) if n in present]
    if not names:
        raise ConfigError(f"cannot shard the {role} ({type(model).__name__}): no layer class to make FSDP units of "
                          f"(it declares no _no_split_modules)", where=f"{_WHERE}.layer_classes",
                          fix="set train.distributed.layer_classes to the class name of its repeated layers, or use "
                              "DDP (remove train.distributed)")
    return names


def check_head(side: nn.Module) -> None:
    """The output head must live in the root unit (its weight is read inside the side's forward)."""
    from torch.distributed.fsdp import FSDPModule

    student = getattr(side, "student", None)
    get_head = getattr(student, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, FSDPModule):
        raise ConfigError(f"the output head ({type(head).__name__}) would be sharded as its own unit: the chunked "
                          f"token loss reads its weight outside the head's forward", where=f"{_WHERE}.layer_classes",
                          fix="name only the repeated layer classes (e.g. LlamaDecoderLayer)")


class _TeacherRun(nn.Module):
    """The root FSDP unit of a sharded teacher: its forward is the teacher's own ``outputs``."""

    def __init__(self, model: nn.Module, outputs: Callable[[Any], dict]):
        super().__init__()
        self.model = model
        self._outputs = outputs

    def forward(self, batch):
        from torch.distributed.tensor import DTensor

        # inside the forward the root unit's parameters are gathered; an output that aliases one (a head weight)
        # must be copied before the unit is resharded
        gathered = {p.untyped_storage().data_ptr() for p in self.model.parameters() if not isinstance(p, DTensor)}
        values = self._outputs(batch)
        return {k: v.clone() if torch.is_tensor(v) and v.untyped_storage().data_ptr() in gathered else v
                for k, v in values.items()}


class FSDPRun:
    """The sharded copies of one `Engine.fit` (see the module docstring)."""

    def __init__(self, dist: DistributedConfig, accelerator, log: Callable[[str], None] = print):
        self.dist = dist
        self.acc = accelerator
        self.log = log
        self.teacher = None  # the teacher object whose model is swapped for its sharded copy during the fit
        self.plain_teacher: Optional[nn.Module] = None

    def _unit_kwargs(self) -> dict:
        plugin = self.acc.state.fsdp_plugin
        return {"mp_policy": plugin.mixed_precision_policy, "reshard_after_forward": self.dist.reshard_after_forward}

    def prepare(self, objective, build_optimizer: Callable[[Any], torch.optim.Optimizer]):
        """The sharded copy of ``objective.side`` and its optimizer (Accelerate's `prepare`); the teacher
        sharded too with ``shard_teacher``."""
        side = objective.side
        names = layer_classes(side, self.dist, "student")
        plugin = self.acc.state.fsdp_plugin
        plugin.transformer_cls_names_to_wrap = names
        sharded = copy.deepcopy(side)
        optimizer = build_optimizer(sharded.parameters())
        model, optimizer = self.acc.prepare(sharded, optimizer)
        check_head(model)
        # every process starts from process 0's weights, as under DDP (lazily built adapters and randomly
        # initialised students differ between processes)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, side.state_dict() if self.acc.is_main_process else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        teacher = objective.teacher
        if self.dist.shard_teacher:
            self._shard_teacher(teacher)
        elif teacher is not None and hasattr(teacher, "to"):  # whole on this process's device, as under DDP
            teacher.to(self.acc.device)
        return model, optimizer

    def _shard_teacher(self, teacher) -> None:
        from torch.distributed.fsdp import fully_shard

        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module) or not hasattr(teacher, "outputs") or \
                not any(True for _ in model.parameters()):
            return  # a cached teacher, a remote one, or no teacher: nothing to shard
        names = set(layer_classes(model, self.dist, "teacher"))
        copied = copy.deepcopy(model).eval()
        for module in reversed(list(copied.modules())):
            if type(module).__name__ in names:
                fully_shard(module, **self._unit_kwargs())
        self.teacher, self.plain_teacher = teacher, model
        teacher.model = copied
        runner = _TeacherRun(copied, teacher.outputs)
        fully_shard(runner, mp_policy=self._unit_kwargs()["mp_policy"])

        def outputs(batch):
            values = runner(batch)
            runner.reshard()  # the root unit is not resharded after its forward by FSDP itself
            return values

        teacher.outputs = outputs
        teacher.grad_free = torch.no_grad  # FSDP's gathered buffers must not become inference tensors

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every process writes its shards of the model and optimizer state into `folder`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    # -- back to plain models ------------------------------------------------------------------------------------
    def sync(self, objective, model: nn.Module) -> None:
        """The sharded side's current weights gathered (on every process) into the plain ``objective.side``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = objective.side
        device = next((t.device for t in plain.state_dict().values()), torch.device("cpu"))
        missing, unexpected = plain.load_state_dict({k: v.to(device) for k, v in full.items()}, strict=False)
        if missing or unexpected:
            raise WiringError(f"the sharded side's weights do not match the plain side (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", where="kdistill.engine.fsdp",
                              fix="report this as a bug")

    def finish(self, objective, model: nn.Module) -> nn.Module:
        """The trained weights in the plain side, the teacher's own model back: the plain side."""
        self.sync(objective, model)
        self.release(objective)
        return objective.side

    def release(self, objective) -> None:
        """The teacher's own model back and the objective calling its plain side (also after an error)."""
        if self.teacher is not None:
            self.teacher.model = self.plain_teacher
            for name in ("outputs", "grad_free"):
                self.teacher.__dict__.pop(name, None)
            self.teacher = self.plain_teacher = None
        objective.module = objective.side

    @staticmethod
    def plain_batch(batch: dict, side: nn.Module) -> dict:
        """The first batch on the plain side's device (the dry run runs on the plain models)."""
        from kdistill.engine.batches import to_device

        device = next((p.device for p in side.parameters()), torch.device("cpu"))
        return to_device(batch, device)

    @staticmethod
    def local(params: list) -> list:
        """This process's shards of sharded parameters (the non-finite check reads them)."""
        return [p.to_local() if hasattr(p, "to_local") else p for p in params]
