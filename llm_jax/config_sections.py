"""The config files' building blocks: every section with its defaults, and preset parsing.

Lives in the package, not in configs/, so that a config file passed by absolute path works
from any directory after a plain `pip install .`.
"""

import json
import os

import ml_collections

from llm_jax import model as model_lib
from llm_jax import sharding


def _parse_value(key, value: str, default):
  """Converts a string to the type of the default ('false' is False, not bool('false'))."""
  if isinstance(default, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'config argument {key}={value!r} is not a boolean')
    return value.lower() in ('true', '1')
  return type(default)(value) if default is not None else value


def parse_arg(arg, **defaults):
  """Parses 'key=value,key2=value2' (or a bare preset name) into a ConfigDict of defaults."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      key, value = 'preset', key
    if key not in result:
      raise ValueError(f'unknown config argument {key!r}; expected one of {sorted(result)}')
    result[key] = _parse_value(key, value, result[key])
  return result


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` section: every ModelConfig field, starting from a preset."""
  values = model_lib.to_config_dict(model_lib.get_preset(preset, **overrides))
  values['preset'] = preset
  return ml_collections.ConfigDict(values)


def mesh_section(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
  """The `mesh` section: axis names, their sizes and the logical-axis rules."""
  mesh = ml_collections.ConfigDict()
  mesh.axes = sharding.MESH_AXES
  mesh.shape = tuple(shape)  # -1 fills the remaining devices
  mesh.num_slices = 1  # > 1: slices joined over DCN along the data axis
  mesh.rules = tuple(sharding.DEFAULT_RULES)
  return mesh


def pretraining_config(preset: str, *, seq_len: int, global_batch_size: int, num_steps: int,
                       learning_rate: float, warmup_steps: int, end_lr_ratio: float,
                       tokenizer: str, tokenizer_path: str, adam_eps: float = 1e-8):
  """An accelerator pretraining config: bf16 compute, FSDP over all chips, C4 from TFDS."""
  config = default_config()
  config.model = model_section(preset, dtype='bfloat16',
                               remat_policy='dots_with_no_batch_dims_saveable')
  config.data.dataset = 'tfds'
  config.data.tfds_name = 'c4/en:3.0.1'
  # C4 prepared once in ArrayRecord format (`tfds build c4/en --file_format=array_record
  # --data_dir=...`); a gs:// directory also needs gcsfs installed on the hosts.
  config.data.tfds_data_dir = ''
  config.data.eval_split = 'validation'
  config.data.seq_len = seq_len
  config.data.global_batch_size = global_batch_size
  config.data.eval_batch_size = global_batch_size
  config.data.tokenizer = tokenizer
  config.data.tokenizer_path = tokenizer_path
  config.data.num_workers = 16
  config.optim.learning_rate = learning_rate
  config.optim.warmup_steps = warmup_steps
  config.optim.schedule = 'cosine'
  config.optim.end_lr_ratio = end_lr_ratio
  config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.95, adam_eps
  config.optim.weight_decay = 0.1
  config.optim.grad_clip_norm = 1.0
  config.train.num_steps = num_steps
  config.train.log_every = 50
  config.eval.every_steps = 2000
  config.eval.num_batches = 50
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 3
  config.mesh = mesh_section(shape=(1, -1, 1))  # FSDP over every chip
  config.decode.temperature = 0.7
  return config


def finetuning_config(hf_dir: str, *, lora_rank: int) -> ml_collections.ConfigDict:
  """Supervised fine-tuning on chat data (data.dataset='sft'), in full or with LoRA.

  Args:
    hf_dir: a Hugging Face directory whose model, tokenizer and chat template are fine-tuned;
      '' = the tiny model on the docstring task built from the embedded stdlib corpus.
    lora_rank: 0 = full fine-tuning, else the LoRA rank (alpha = 2 * rank).
  """
  config = default_config()
  config.data.dataset = 'sft'
  config.data.seq_len = 256
  config.data.global_batch_size = config.data.eval_batch_size = 8
  config.optim.learning_rate = 1e-3 if lora_rank else 3e-4
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.0
  config.train.num_steps = 200
  config.eval.every_steps = 100
  config.eval.num_batches = 8
  config.checkpoint.every_steps = 100
  config.lora.rank = lora_rank
  config.lora.alpha = 2.0 * lora_rank if lora_rank else config.lora.alpha
  config.decode.prompts = ()  # continuations of code prompts say little about a chat model
  if hf_dir:
    from llm_jax.convert import hf  # pylint: disable=g-import-not-at-top
    with open(os.path.join(hf_dir, hf.CONFIG_FILE)) as f:
      model_config = hf.config_from_hf(json.load(f), scan_layers=False)
    config.model = ml_collections.ConfigDict(dict(model_lib.to_config_dict(model_config),
                                                  preset=''))
    config.data.tokenizer, config.data.tokenizer_path = 'huggingface', hf_dir
    config.train.init_from = hf_dir
  return config


def default_config(arg=None) -> ml_collections.ConfigDict:
  """The default config (configs/default.py); `arg` may name another model preset (`:tiny`)."""
  args = parse_arg(arg, preset='tiny')
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Unrolled layers: ~15% faster steps on a CPU than nn.scan, and 4 layers compile quickly.
  # Blockwise attention skips the masked half of the scores and stores none of them: the
  # fastest kernel on a CPU, and exact on any backend.
  config.model = model_section(args.preset, scan_layers=False,
                                      attention_kernel='blockwise')

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'stdlib'  # stdlib | text_files | tfds | sft
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
  # dataset=sft: chat conversations, loss on the assistant's tokens (llm_jax/data/sft.py).
  config.data.sft_files = ''  # JSONL globs, comma-separated; '' = the stdlib docstring task
  config.data.sft_max_conversations = 5000  # conversations of the docstring task
  config.data.sft_eval_every = 20  # every n-th conversation is held out for evaluation
  config.data.sft_assistant_turns = 'all'  # all | last: which assistant turns are targets
  config.data.sft_truncation = 'truncate'  # truncate (keep the start) | drop: too-long ones
  config.data.chat_template = 'auto'  # auto (the tokenizer directory's) | llama2 | llama3 | .jinja

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
  # Parameters to fine-tune: an Orbax checkpoint dir (a workdir, or from llm_jax.convert) or a
  # Hugging Face directory (read straight into the shardings). With lora.rank > 0, the base.
  config.train.init_from = ''

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 0  # > 0: train LoRA adapters on the frozen base (llm_jax/model/lora.py)
  config.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  config.lora.dropout = 0.0
  config.lora.targets = 'q,k,v,o,gate,up,down'  # projections that get adapters

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 100
  config.eval.num_batches = 16  # 0 = the whole validation split

  # Task evaluators run every N steps, logged as evals/<name>/<metric> (llm_jax.evals.in_loop):
  # name -> ConfigDict(kind='perplexity' | 'multiple_choice' | 'classification' |
  # 'summarization' | 'translation', path=..., every_steps=N, ...). Empty: none.
  config.evals = ml_collections.ConfigDict()

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.keep = 2
  config.checkpoint.keep_best = 0  # > 0: also keep this many steps of lowest eval loss
  config.checkpoint.async_save = True
  # Resume from this step instead of the latest (0 = latest), e.g. when the latest is unreadable.
  config.checkpoint.restore_step = 0

  config.mesh = mesh_section()

  config.decode = ml_collections.ConfigDict()
  config.decode.prompts = ('import os\n', 'def main(', 'class ')
  config.decode.max_new_tokens = 48
  config.decode.temperature = 0.8
  config.decode.top_k = 40
  config.decode.top_p = 0.95
  return config
