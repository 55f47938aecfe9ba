"""Encoder and sentence-embedding distillation (BERT-family teachers and students, sentence-transformers models).

Pieces, each usable alone (see docs/encoders.md):

* `load_encoder`, `load_sentence_encoder`, `SentenceEncoder` -- offline loading, pooling, sentence-transformers
  export;
* `layer_map` -- uniform / last / last-K / explicit layer pairs, validated against both depths;
* `build_student` -- fewer layers (initialised from chosen teacher layers) and/or a smaller hidden size;
* `EncoderDistiller` + terms (`distilbert_terms`, `tinybert_terms`, `minilm_terms`, `embedding_terms`, each a
  list of `kdistill.objective.Term`s of registered losses) -- the objective, trained by the one
  `kdistill.engine.Engine`;
* `teacher_embeddings` -- the teacher's sentence embeddings through the shared teacher-output cache;
* `load_sentence_corpus`, `sentence_dataset` -- offline Wikipedia sentences and labelled tweets;
* `encode`, `similarity_spearman`, `linear_probe`, `encode_latency_ms` -- evaluation;
* the whole sentence-embedding job of ``examples/minilm.yaml`` is the task ``sentence_embedding``
  (`kdistill.tasks.sentence_embedding`).

The per-layer loss functions live in `kdistill.losses.encoder`.
"""

from kdistill.encoders.data import load_sentence_corpus, sentence_dataset, tweets, wiki_sentences
from kdistill.encoders.distiller import (
    EncoderDistiller,
    EncoderTeacher,
    distilbert_terms,
    embedding_terms,
    minilm_terms,
    tinybert_terms,
)
from kdistill.encoders.embedding_cache import ReorderedTeacher, teacher_embeddings
from kdistill.encoders.evaluate import encode, encode_latency_ms, linear_probe, similarity_spearman
from kdistill.encoders.features import encoder_features
from kdistill.encoders.layers import layer_map
from kdistill.encoders.models import (
    SentenceEncoder,
    encoder_layout,
    load_encoder,
    load_sentence_encoder,
    load_tokenizer,
    minilm_path,
)
from kdistill.encoders.objectives import MaskedLM, simcse
from kdistill.encoders.student import build_student, student_config, teacher_layers_of
from kdistill.encoders.terms import encoder_loss_names

__all__ = [
    "EncoderDistiller",
    "EncoderTeacher",
    "MaskedLM",
    "ReorderedTeacher",
    "SentenceEncoder",
    "build_student",
    "distilbert_terms",
    "embedding_terms",
    "encode",
    "encode_latency_ms",
    "encoder_features",
    "encoder_loss_names",
    "encoder_layout",
    "layer_map",
    "linear_probe",
    "load_encoder",
    "load_sentence_corpus",
    "load_sentence_encoder",
    "load_tokenizer",
    "minilm_path",
    "minilm_terms",
    "sentence_dataset",
    "similarity_spearman",
    "simcse",
    "student_config",
    "teacher_embeddings",
    "teacher_layers_of",
    "tinybert_terms",
    "tweets",
    "wiki_sentences",
]

