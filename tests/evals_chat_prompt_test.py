"""Task prompts with chat_template='auto' use the model directory's own template, as generation
does: the ids equal transformers' apply_chat_template of the same few-shot conversation."""

from chat_templates_test import bpe, reference_ids, save_family  # pylint: disable=unused-import
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.evals import tasks as tasks_lib


def test_auto_chat_prompt_is_the_directorys_own_template(bpe, tmp_path):  # pylint: disable=redefined-outer-name
  hf_tokenizer = save_family(bpe, 'chatml', str(tmp_path))
  tokenizer = tokenizer_lib.load_tokenizer(str(tmp_path))
  spec = tasks_lib.spec_from_dict('reviews', {
      'kind': 'classification', 'path': 'unused.jsonl', 'prompt': 'Review: {text}',
      'labels': ['bad', 'good'], 'chat_template': 'auto', 'system': 'Answer briefly.'})
  shot, example = {'text': 'the quick fox', 'label': 'good'}, {'text': 'the lazy dog'}
  ids = tasks_lib.prompt_ids(spec, tokenizer, example, [shot], model_dir=str(tmp_path))
  messages = [{'role': 'system', 'content': 'Answer briefly.'},
              {'role': 'user', 'content': 'Review: the quick fox'},
              {'role': 'assistant', 'content': 'good'},
              {'role': 'user', 'content': 'Review: the lazy dog'}]
  assert ids == reference_ids(hf_tokenizer, messages)
