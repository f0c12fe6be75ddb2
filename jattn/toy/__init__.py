"""A copy-task trainer for jattn: the code behind ``train_toy.py``.

Files, one job each: ``validation`` (config checks), ``data`` (deterministic batches),
``model`` (decoder-only Transformer), ``mesh`` (device mesh and shardings), ``train``
(state, train/eval steps, greedy decoding), ``checkpoint`` (verified orbax checkpoints),
``metrics`` (metrics.jsonl, summary.json), ``plots`` (attention.png, grad_flow.png),
``gradcheck`` (finite-difference check at start-up), ``workdir_lock`` (one run per
workdir), ``errors`` (user-facing failures) and ``run`` (the training loop).
"""
