"""Default config: the tiny Llama trained on the embedded Python-stdlib corpus, on a CPU.

    python -m llm_jax.main --config=configs/default.py --workdir=/tmp/run
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Returns the default config; `arg` may name another model preset (configs/default.py:tiny)."""
  args = common.parse_arg(arg, preset='tiny')
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Unrolled layers: ~15% faster steps on a CPU than nn.scan, and 4 layers compile quickly.
  # Blockwise attention skips the masked half of the scores and stores none of them: the
  # fastest kernel on a CPU, and exact on any backend.
  config.model = common.model_section(args.preset, scan_layers=False,
                                      attention_kernel='blockwise')

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'stdlib'  # stdlib | text_files | tfds
  config.data.tfds_name = ''  # for dataset=tfds, e.g. 'lm1b' or 'c4/en:3.0.1'
  config.data.tfds_data_dir = ''  # '' = TFDS default
  config.data.text_feature = 'text'  # for dataset=tfds: the feature holding the text
  config.data.text_glob = ''  # for dataset=text_files: local .txt / .jsonl files
  config.data.jsonl_field = 'text'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.seq_len = 256
  config.data.global_batch_size = 16
  config.data.eval_batch_size = 16
  config.data.packing = True  # False: one document per row, padded
  config.data.shuffle_seed = 0
  config.data.num_workers = 0  # grain worker processes; 0 = in-process
  config.data.tokenizer = 'train_spm'  # train_spm | sentencepiece | huggingface
  config.data.tokenizer_path = ''  # .model or tokenizer.json; for train_spm, '' = workdir
  config.data.tokenizer_train_bytes = 4_000_000  # text used to train the SentencePiece model

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50
  config.optim.schedule = 'cosine'  # cosine | linear | constant
  config.optim.end_lr_ratio = 0.1
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.1
  config.optim.decay_embeddings = False
  config.optim.grad_clip_norm = 1.0
  config.optim.z_loss = 0.0
  config.optim.grad_accum_steps = 1

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.nonfinite = 'skip'  # skip | stop: what a NaN/Inf loss or gradient does
  config.train.init_from = ''  # Orbax checkpoint dir (e.g. from llm_jax.convert) to fine-tune

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 100
  config.eval.num_batches = 16  # 0 = the whole validation split

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.checkpoint.async_save = True

  config.mesh = common.mesh_section()

  config.decode = ml_collections.ConfigDict()
  config.decode.prompts = ('import os\n', 'def main(', 'class ')
  config.decode.max_new_tokens = 48
  config.decode.temperature = 0.8
  config.decode.top_k = 40
  config.decode.top_p = 0.95
  return config
