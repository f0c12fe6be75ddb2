"""Default toy config: copy a random sequence of 10 symbols (``python train_toy.py``).

Every field is checked by ``jattn.toy.validation.validate`` before anything compiles;
unknown fields are rejected. Override any field with ``--config.<field>=<value>``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # --- task ---
    c.task = "copy"  # 'copy' (output = input) or 'reverse' (output = input reversed)
    c.seq_len = 10  # L: symbols per source sequence; the model sees [BOS, x_1..x_L, SEP, y_1..y_L]
    c.vocab_size = 13  # model vocabulary: 3 specials (PAD, BOS, SEP) + vocab_size-3 data symbols
    c.num_eval_sequences = 512  # held-out sequences (never trained on) decoded at each eval
    # --- model: decoder-only Transformer, pre-LayerNorm, sinusoidal positions ---
    c.num_layers = 2  # Transformer blocks
    c.d_model = 64  # residual width
    c.num_heads = 4  # attention heads per block; must divide d_model
    c.mlp_dim = 256  # hidden width of each block's MLP
    c.attention_implementation = config_dict.placeholder(str)  # jattn implementation; None = automatic
    # --- optimisation: AdamW, linear warmup then cosine decay to 0, global-norm clipping ---
    c.num_train_steps = 300  # optimizer steps (held-out seq_accuracy reaches 0.99-1.0 by step ~100; 3x margin)
    c.batch_size = 64  # sequences per step (split over the 'data' mesh axis)
    c.learning_rate = 3e-3  # peak learning rate, reached after warmup_steps
    c.warmup_steps = 30  # linear warmup from 0; must be < num_train_steps
    c.weight_decay = 0.01  # AdamW decoupled weight decay
    c.grad_clip_norm = 1.0  # clip the global gradient norm to this value
    c.seed = 0  # seeds parameters and the data stream; a run is reproducible from it
    # --- logging, evaluation, checkpoints ---
    c.log_every_steps = 10  # write a metrics.jsonl row (loss, accuracy, gradient norms)
    c.eval_every_steps = 50  # greedy-decode the held-out set and print samples
    c.num_samples_to_print = 3  # decoded samples shown (CORRECT/INCORRECT) per eval
    c.checkpoint_every_steps = 100  # orbax checkpoint interval (and one at the end)
    c.max_checkpoints_to_keep = 2  # older ones are deleted, only once the newest is read back and verified
    c.check_grads = True  # at start-up, compare jattn's gradients with finite differences
    # --- device mesh: data x sequence devices (e.g. --config.mesh.data=2 --config.mesh.sequence=4) ---
    # With sequence P > 1 the training batch is padded to a multiple of 2P positions (zero loss weight)
    # and permuted into ring attention's zig-zag layout; evaluation and decoding are not sequence-split.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data-parallel (batch) axis; -1 = all devices (of every process) left by sequence
    c.mesh.sequence = 1  # devices per training sequence (ring attention; needs attention_implementation None)
    return c
