"""Compress and deploy: structured pruning, low-rank factorization, quantization (QAT / post-training int8), each
a resumable stage with KD recovery, and export to ONNX (fp32, int8) measured on its runtime.

* `kdistill.compress.prune`: channel pruning with torch-pruning (DepGraph) to a MACs / parameter target;
* `kdistill.compress.low_rank`: SVD factorization of Linear layers and 1x1 convolutions;
* `kdistill.compress.arch`: a model's changed layer shapes as JSON, so a compressed model reloads without the
  library that compressed it;
* `kdistill.compress.quantize`: quantization-aware distillation (torchao fake-quantized int8);
* `kdistill.compress.export`: ONNX export, onnxruntime sessions, int8 (dynamic / static) quantization;
* `kdistill.compress.stages`: the ``compress:`` / ``export:`` stages of a run.

Modules are imported on use: the optional ``deploy`` dependencies are loaded only by the stages that need them.
"""
