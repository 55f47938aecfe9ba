"""Causal-LM distillation: token-level KD from hidden states (live or cached teacher), on-policy GKD,
sequence-level (black-box) KD, students cut from the teacher, vocabulary checks, offline loading, and
cross-tokenizer distillation on text views (`CrossTokenizerDistiller`, `text_view_dataset`). docs/llm.md.

The chunked head losses live in `kdistill.losses.lm` (re-exported here); the job of a ``task: causal_lm`` config
is `kdistill.tasks.causal_lm`. Needs ``transformers`` (``pip install 'kdistill[llm]'``); importing this package
does not import it.
"""

from kdistill.llm.cache import build_lm_cache
from kdistill.llm.cross_data import text_view_dataset, text_windows, texts_of
from kdistill.llm.cross_distiller import (ColumnTeacher, CrossTeacher, CrossTokenizerDistiller, bits_per_char,
                                          precompute_teacher)
from kdistill.llm.data import block_dataset, lm_inputs, prompt_response_dataset
from kdistill.llm.distiller import LMDistiller, LMSide, LMTeacher
from kdistill.llm.heads import final_hidden_states, head_parts
from kdistill.llm.hf import load_causal_lm, load_smollm2, load_tokenizer, smollm2_path
from kdistill.llm.onpolicy import OnPolicy, sample_continuations
from kdistill.llm.sequence import HFGenerator, Sampling, generate_dataset, read_jsonl, response_dataset
from kdistill.llm.student import decoder_layers_path, student_from_teacher
from kdistill.losses.lm import (DIVERGENCES, chunked_head_loss, dense_token_kd_loss, next_token_ce, shift_labels,
                                sparse_token_kd_loss, token_kd_loss)
from kdistill.models.vocab import check_vocab

__all__ = [
    "ColumnTeacher", "CrossTeacher", "CrossTokenizerDistiller", "bits_per_char", "precompute_teacher",
    "text_view_dataset", "text_windows", "texts_of",
    "DIVERGENCES", "HFGenerator", "LMDistiller", "LMSide", "LMTeacher", "OnPolicy", "Sampling", "block_dataset",
    "build_lm_cache", "check_vocab", "chunked_head_loss", "decoder_layers_path", "dense_token_kd_loss",
    "final_hidden_states", "generate_dataset", "head_parts", "lm_inputs", "load_causal_lm", "load_smollm2",
    "load_tokenizer", "next_token_ce", "prompt_response_dataset", "read_jsonl", "response_dataset",
    "sample_continuations", "shift_labels", "smollm2_path", "sparse_token_kd_loss", "student_from_teacher",
    "token_kd_loss",
]
