"""Online distillation: deep mutual learning (Zhang, Xiang, Hospedales, Lu 2018, "Deep Mutual Learning").

N >= 2 peers start from scratch and train together, with no pre-trained teacher. Peer k minimizes

    L_k = CE(z_k, y) + w * T^2 * KL( mean_{l != k} softmax(z_l / T)  ||  softmax(z_k / T) )

where the target (the average of the other peers' predictions) is treated as a constant for peer k. All peers
take their step on the same batch at the same time: the peers' parameters are disjoint and each target is
detached, so one backward of sum_k L_k gives every peer exactly the gradient of its own L_k (the paper alternates
peer updates within a mini-batch; this is the simultaneous variant). Every peer and the peer ensemble (the mean
of the peers' probabilities) are evaluated.
"""

from __future__ import annotations

import math
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
    KL to the average of the other peers' predictions."""

    name: Literal["mutual"]
    peers: Union[list[ModelConfig], int] = Field(2, description="number of copies of `student`, or the peer models")
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)

    @field_validator("peers")
    @classmethod
    def _two_or_more(cls, v):
        if (v if isinstance(v, int) else len(v)) < 2:
            raise ValueError("mutual learning needs at least 2 peers")
        return v


def mutual_targets(peer_logits: Sequence[torch.Tensor], temperature: float = 1.0) -> list[torch.Tensor]:
    """For each peer k, the logits of mean_{l != k} softmax(z_l / T), scaled by T so that a temperature-T
    softmax of them gives back that mean (the form `kdistill.losses.kd` expects). Detached."""
    log_probs = torch.stack([torch.log_softmax(z.detach().float() / temperature, -1) for z in peer_logits])
    n = len(peer_logits)
    targets = []
    for k in range(n):
        others = torch.cat([log_probs[:k], log_probs[k + 1:]])
        targets.append(temperature * (torch.logsumexp(others, 0) - math.log(n - 1)))
    return targets


class MutualSide(SchemeSide):
    """The peers as one trainable module: forward -> (ensemble logits, {ce_peer<k>, kl_peer<k>})."""

    def __init__(self, peers: Sequence[nn.Module], temperature: float = 1.0, kl_weight: float = 1.0):
        super().__init__()
        if len(peers) < 2:
            raise WiringError(f"mutual learning needs at least 2 peers, got {len(peers)}", where="scheme.peers")
        self.peers = nn.ModuleList(peers)
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.step = 0
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
        logits = [logits_of(call_model(p, inputs)) for p in self.peers]
        targets = mutual_targets(logits, self.temperature)
        terms = {}
        for k, (z, target) in enumerate(zip(logits, targets)):
            terms[f"ce_peer{k}"] = ce(z, labels)
            terms[f"kl_peer{k}"] = self.kl_weight * kd(z, target, self.temperature)
        with torch.no_grad():
            ensemble = torch.logsumexp(torch.stack([torch.log_softmax(z.float(), -1) for z in logits]), 0)
        return ensemble, terms


class MutualObjective(SideObjective):
    def __init__(self, peers: Sequence[nn.Module], temperature: float = 1.0, kl_weight: float = 1.0):
        super().__init__(MutualSide(peers, temperature, kl_weight))

    @property
    def peers(self) -> list[nn.Module]:
        return list(self.side.peers)


def train_mutual(peers: Sequence[nn.Module], data, train_cfg: TrainConfig, *, temperature: float = 1.0,
                 kl_weight: float = 1.0, seed: int = 0, run_dir: Optional[Path] = None, stage: str = "mutual",
                 progress: bool = False, log=print) -> ProbabilityEnsemble:
    """Train `peers` together by deep mutual learning; returns their ensemble (``.members`` are the peers)."""
    objective = MutualObjective(peers, temperature, kl_weight)
    return run_stage(stage, objective, data, train_cfg, seed=seed, run_dir=run_dir, progress=progress, log=log,
                     side_weights=True)[0]


@scheme_run
def run(job: SchemeJob) -> dict:
    cfg, scheme = job.cfg, job.cfg.scheme
    peer_cfgs = [cfg.student] * scheme.peers if isinstance(scheme.peers, int) else list(scheme.peers)
    peers = [job.model(pc, cfg.seed + 202 + 17 * k, f"scheme.peers[{k}]") for k, pc in enumerate(peer_cfgs)]
    ensemble = train_mutual(peers, job.bundle.train, cfg.train, temperature=scheme.temperature,
                            kl_weight=scheme.kl_weight, seed=cfg.seed + 3, **job.stage_options)
    models = {}
    if cfg.baseline:
        models["baseline (scratch)"] = job.evaluate(job.baseline())
    ensemble_logits = predict_logits(ensemble, job.bundle.test)
    for k, peer in enumerate(ensemble.members):
        models[f"peer{k}"] = job.evaluate(peer, reference_logits=ensemble_logits)
    models["peer ensemble"] = job.evaluate(ensemble)
    return job.finish(models)
