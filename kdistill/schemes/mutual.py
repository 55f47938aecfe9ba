"""Online distillation: deep mutual learning (Zhang, Xiang, Hospedales, Lu 2018, "Deep Mutual Learning").

K >= 2 peers start from scratch and train together, with no pre-trained teacher. Peer k minimizes (paper, eq. 9)

    L_k = CE(z_k, y) + w * T^2 * 1/(K-1) * sum_{l != k} KL( softmax(z_l / T)  ||  softmax(z_k / T) )

the average of the pairwise KLs from every other peer (not the KL from the other peers' mean: by convexity of KL
that one is smaller, e.g. 3.56 vs 4.05 for 3 peers on random logits), each other peer's prediction a constant
for peer k. Two update orders (``scheme.update``):

* ``alternating`` (the paper's Algorithm 1): on each mini-batch the peers are updated one after the other, and
  peer k's targets are the other peers' predictions *recomputed after* peers 0..k-1 took their step. Here one
  engine step updates one peer (peer ``step mod K``; the others get no gradient and are not stepped) and the K
  steps of a cycle share the cycle's first mini-batch, so ``train.steps`` counts peer updates: K times the
  mini-batches (single process: a resumed run mid-cycle takes the current batch for the rest of the cycle).
* ``simultaneous`` (default): every peer steps on the same batch at once, its targets the other peers'
  predictions *before* this step; one backward of sum_k L_k gives each peer the gradient of its own L_k (peers'
  parameters are disjoint, targets detached). This is not the paper's gradient for K - 1 of the peers (their
  targets come from the not-yet-updated peers), but it costs one forward per peer per step.

Every peer and the peer ensemble (the mean of the peers' probabilities) are evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from kdistill.configbase import Strict
from kdistill.errors import WiringError
from kdistill.evaluate import predict_logits
from kdistill.losses import ce, kd
from kdistill.objective import SchemeSide, SideObjective
from kdistill.outputs import call_model, logits_of
from kdistill.schemes.common import ProbabilityEnsemble, SchemeJob, scheme_run
from kdistill.schemes.sections import ModelConfig
from kdistill.tasks.job import run_stage
from kdistill.train_config import TrainConfig


class MutualScheme(Strict):
    """Deep mutual learning (Zhang et al. 2018): peers trained together from scratch, each with CE plus
    the average of the KLs from each other peer's prediction; simultaneous or alternating (the paper's) updates."""

    name: Literal["mutual"]
    peers: Union[list[ModelConfig], int] = Field(2, description="number of copies of `student`, or the peer models")
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)
    update: Literal["simultaneous", "alternating"] = Field(
        "simultaneous", description="alternating: the paper's peer-by-peer updates (train.steps counts peer updates)")

    @field_validator("peers")
    @classmethod
    def _two_or_more(cls, v):
        if (v if isinstance(v, int) else len(v)) < 2:
            raise ValueError("mutual learning needs at least 2 peers")
        return v


def mutual_kl(peer_logits: Sequence[torch.Tensor], k: int, temperature: float = 1.0) -> torch.Tensor:
    """Peer k's mimicry term: T^2 * 1/(K-1) * sum_{l != k} KL(softmax(z_l / T) || softmax(z_k / T)), the other
    peers' logits detached."""
    others = [z for l, z in enumerate(peer_logits) if l != k]
    return sum(kd(peer_logits[k], z.detach(), temperature) for z in others) / len(others)


class MutualSide(SchemeSide):
    """The peers as one trainable module: forward -> (ensemble logits, {ce_peer<k>, kl_peer<k>})."""

    def __init__(self, peers: Sequence[nn.Module], temperature: float = 1.0, kl_weight: float = 1.0,
                 update: str = "simultaneous"):
        super().__init__()
        if update not in ("simultaneous", "alternating"):
            raise WiringError(f"unknown update order '{update}'", where="scheme.update",
                              fix="use 'simultaneous' or 'alternating'")
        if len(peers) < 2:
            raise WiringError(f"mutual learning needs at least 2 peers, got {len(peers)}", where="scheme.peers")
        self.peers = nn.ModuleList(peers)
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.update = update
        self.step = 0
        self._cycle_inputs = None   # alternating: the mini-batch of the current cycle
        # the ensemble view of the peers; not a registered child, so the state dict holds each weight once
        object.__setattr__(self, "_ensemble", ProbabilityEnsemble(self.peers))

    @property
    def student(self) -> nn.Module:
        return self._ensemble

    def build(self, inputs, teacher_values, labels) -> None:
        if labels is None:
            raise WiringError("mutual learning needs labels 'y' (each peer has a CE term)")
        shapes = {tuple(logits_of(call_model(p, inputs)).shape) for p in self.peers}
        if len(shapes) != 1:
            raise WiringError(f"the peers' outputs differ in shape: {sorted(shapes)}", where="scheme.peers",
                              fix="give every peer the same number of classes")

    def forward(self, inputs, teacher_values, labels):
        active = None
        if self.update == "alternating" and self.training:
            active = self.step % len(self.peers)
            if active == 0 or self._cycle_inputs is None:
                self._cycle_inputs = (inputs, labels)
            inputs, labels = self._cycle_inputs
        logits = []
        for k, peer in enumerate(self.peers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and active in (None, k)):
                logits.append(logits_of(call_model(peer, inputs)))
        terms = {}
        for k, z in enumerate(logits):
            terms[f"ce_peer{k}"] = ce(z, labels)
            terms[f"kl_peer{k}"] = self.kl_weight * mutual_kl(logits, k, self.temperature)
        with torch.no_grad():
            ensemble = torch.logsumexp(torch.stack([torch.log_softmax(z.float(), -1) for z in logits]), 0)
        return ensemble, terms


class MutualObjective(SideObjective):
    def __init__(self, peers: Sequence[nn.Module], temperature: float = 1.0, kl_weight: float = 1.0,
                 update: str = "simultaneous"):
        super().__init__(MutualSide(peers, temperature, kl_weight, update))

    @property
    def peers(self) -> list[nn.Module]:
        return list(self.side.peers)


def train_mutual(peers: Sequence[nn.Module], data, train_cfg: TrainConfig, *, temperature: float = 1.0,
                 kl_weight: float = 1.0, update: str = "simultaneous", seed: int = 0, run_dir: Optional[Path] = None,
                 stage: str = "mutual", progress: bool = False, log=print) -> ProbabilityEnsemble:
    """Train `peers` together by deep mutual learning; returns their ensemble (``.members`` are the peers).
    With ``update="alternating"`` each step updates one peer (``train_cfg.steps`` counts peer updates)."""
    if update == "alternating" and train_cfg.grad_accum > 1:
        raise WiringError("alternating DML updates take one whole mini-batch per step", where="train.grad_accum",
                          fix="set train.grad_accum: 1, or scheme.update: simultaneous")
    objective = MutualObjective(peers, temperature, kl_weight, update)
    return run_stage(stage, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log,
                     side_weights=True)[0]


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, scheme = job.cfg, job.cfg.scheme
    peer_cfgs = [cfg.student] * scheme.peers if isinstance(scheme.peers, int) else list(scheme.peers)
    peers = [job.model(pc, cfg.seed + 202 + 17 * k, f"scheme.peers[{k}]") for k, pc in enumerate(peer_cfgs)]
    ensemble = train_mutual(peers, job.bundle.train, cfg.train, temperature=scheme.temperature,
                            kl_weight=scheme.kl_weight, update=scheme.update, seed=cfg.seed + 3, **job.stage_options)
    models = {}
    if cfg.baseline:
        models["baseline (scratch)"] = job.evaluate(job.baseline())
    ensemble_logits = predict_logits(ensemble, job.bundle.test)
    for k, peer in enumerate(ensemble.members):
        models[f"peer{k}"] = job.evaluate(peer, reference_logits=ensemble_logits)
    models["peer ensemble"] = job.evaluate(ensemble)
    return job.finish(models)
