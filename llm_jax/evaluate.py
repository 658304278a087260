"""Evaluates a model on named tasks; prints a Markdown table and writes JSON and Markdown.

    python -m llm_jax.evaluate --hf_dir=/ckpt/SmolLM2-135M-Instruct --tasks=sentiment,xsum
    python -m llm_jax.evaluate --workdir=/tmp/run --tasks=reviews --task_file=tasks.json \\
        --output_dir=/tmp/run/eval --num_fewshot=5 --limit=200

Built-in tasks read the files of `benchmarks/prepare_real_data.py` from --data_dir; a task file
(JSON) defines others over local JSONL/CSV files or TFDS datasets (see llm_jax/evals/runner.py).
"""

from absl import app
from absl import flags

from llm_jax.evals import runner

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (or checkpoint dir) to load.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face Llama directory to load.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer file replacing the default.')
_TASKS = flags.DEFINE_list('tasks', None, 'Task names, comma-separated.', required=True)
_TASK_FILE = flags.DEFINE_string('task_file', None, 'JSON file of extra task definitions.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where relative task paths are read; default '
                                '$LLM_JAX_EVAL_DATA or ~/.cache/llm_jax/eval_data.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Write results.json and results.md here.')
_MESH = flags.DEFINE_list('mesh', [], 'Mesh shape data,fsdp,tensor; default one device.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Requests per compiled call.')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'Replace every task\'s shot count.')
_CHAT_TEMPLATE = flags.DEFINE_string('chat_template', None, "Replace every task's chat "
                                     "template ('' = plain prompts, 'auto', 'llama3', ...).")
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate at most this many examples per task.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (_WORKDIR.value is None) == (_HF_DIR.value is None):
    raise app.UsageError('pass exactly one of --workdir and --hf_dir')
  overrides = {key: flag.value for key, flag in (('num_fewshot', _NUM_FEWSHOT),
                                                 ('chat_template', _CHAT_TEMPLATE),
                                                 ('limit', _LIMIT)) if flag.value is not None}
  results = runner.run(tasks=_TASKS.value, workdir=_WORKDIR.value, hf_dir=_HF_DIR.value,
                       tokenizer=_TOKENIZER.value, task_file=_TASK_FILE.value,
                       output_dir=_OUTPUT_DIR.value, mesh=_MESH.value or None,
                       batch_size=_BATCH_SIZE.value, data_dir=_DATA_DIR.value,
                       overrides=overrides)
  print(runner.markdown(results), end='')


if __name__ == '__main__':
  app.run(main)
