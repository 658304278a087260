"""The `llm_jax` model class of lm-evaluation-harness.

    import lm_eval
    from llm_jax.evals.lm_eval_model import LlmJaxLM
    lm = LlmJaxLM(hf_dir='/ckpt/SmolLM2-135M-Instruct', batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=['hellaswag'])

or by name, once this module is imported (`lm_eval.simple_evaluate(model='llm_jax',
model_args='workdir=/tmp/run')`), or from the command line through
`python -m llm_jax.evals.lm_eval_cli run --model llm_jax --model_args hf_dir=DIR ...`
(lm-eval's own `lm_eval` command finds only the classes it ships).

Tokenisation follows lm-eval's `hf` class so that scores are comparable: a string is encoded
with BOS in front (`add_bos_token=True`, as Llama tokenizers do), an empty context is replaced
by the BOS token, and generation is greedy unless a task asks for sampling, stopping at EOS or
at the first of the task's `until` strings. Scoring runs in `llm_jax.evals.scoring`, generation
in `llm_jax.inference.decode.generate`, both on the mesh given by `mesh=` (data,fsdp,tensor
sizes, written `1x1x-1` inside model_args).
"""

import json
from typing import Optional

from lm_eval.api import model as lm_model
from lm_eval.api import registry
import lm_eval.models  # pylint: disable=unused-import  (registers lm-eval's own classes first)
from lm_eval.models import utils as lm_utils
from tqdm import tqdm

from llm_jax.evals import model_source
from llm_jax.evals import scoring
from llm_jax.inference import decode

NAME = 'llm_jax'
_DEFAULT_BATCH_SIZE = 8


def _batch_size(value) -> int:
  """lm-eval passes ints, strings, or 'auto' (not supported here: a fixed default is used)."""
  if value is None or value == 'auto' or str(value).startswith('auto'):
    return _DEFAULT_BATCH_SIZE
  try:
    size = int(value)
  except ValueError as e:
    raise ValueError(f'batch_size={value!r}; expected a positive integer') from e
  if size < 1:
    raise ValueError(f'batch_size={value!r}; expected a positive integer')
  return size


@registry.register_model(NAME)
class LlmJaxLM(lm_model.TemplateLM):
  """An llm_jax model (training workdir or HF directory) behind lm-eval's LM interface.

  Args:
    hf_dir: a transformers Llama directory (weights and tokenizer).
    workdir: a training workdir (latest checkpoint and `tokenizer.model`).
    tokenizer: a tokenizer file, replacing the directory's.
    step: checkpoint step of `workdir` (default: the latest).
    batch_size: requests per compiled call.
    max_length: longest input the model reads (default: the model's max_seq_len).
    max_gen_toks: default number of tokens `generate_until` may produce.
    add_bos_token: whether encoded strings start with BOS.
    mesh: data,fsdp,tensor mesh sizes such as '1x1x-1' (default: one device).
    model: instead of loading, a ready (ModelConfig, params, tokenizer) triple.
    **unused: what lm-eval's command line passes to every class (device, max_batch_size).
  """

  def __init__(self, hf_dir: Optional[str] = None, workdir: Optional[str] = None,
               tokenizer: Optional[str] = None, step: Optional[int] = None, batch_size=None,
               max_length: Optional[int] = None, max_gen_toks: int = 256,
               add_bos_token: bool = True, mesh=None, model: Optional[tuple] = None, **unused):
    super().__init__()
    del unused  # device / max_batch_size: placement comes from `mesh`
    if model is None:
      model = model_source.load_model(workdir=workdir, hf_dir=hf_dir, tokenizer_path=tokenizer,
                                      step=step)
    self.config, self.params, self.tokenizer_impl = model
    self.mesh = model_source.parse_mesh(mesh)
    self.add_bos_token = bool(add_bos_token)
    self._max_gen_toks = int(max_gen_toks)
    self.scorer = scoring.Scorer(self.config, self.params, mesh=self.mesh,
                                 batch_size=_batch_size(batch_size), max_len=max_length)
    self.params = self.scorer.params  # placed on the mesh once, shared with generation

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer_impl.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer_impl.bos_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_len

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
    del kwargs
    with_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
    ids = ([self.tokenizer_impl.bos_id] if with_bos else []) + self.tokenizer_impl.encode(string)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids) -> str:
    return self.tokenizer_impl.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    results = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
    for (request, _, _), answer in zip(requests, results):
      if request is not None:
        self.cache_hook.add_partial('loglikelihood', request, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    texts = [request.args[0] for request in requests]
    documents = [self.tok_encode(text) for text in tqdm(texts, disable=disable_tqdm,
                                                        desc='Tokenizing documents')]
    results = self.scorer.loglikelihood_rolling(documents, self.prefix_token_id)
    for text, logprob in zip(texts, results):
      self.cache_hook.add_partial('loglikelihood_rolling', (text,), logprob)
    return results

  def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    """Continuations of contexts that share one set of generation settings."""
    kwargs = lm_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
    until = lm_utils.handle_stop_sequences(kwargs.pop('until', None), eos=None)
    max_new = int(kwargs.pop('max_gen_toks'))
    room = self.max_length - max_new
    if room < 1:
      raise ValueError(f'max_gen_toks={max_new} leaves no room for a prompt in max_length='
                       f'{self.max_length}')
    sampling = dict(temperature=float(kwargs.get('temperature', 0.0))
                    if kwargs.get('do_sample') else 0.0,
                    top_k=int(kwargs.get('top_k') or 0), top_p=float(kwargs.get('top_p', 1.0)),
                    seed=int(kwargs.get('seed', 0)))
    prompts = [self.tok_encode(c, left_truncate_len=room) for c in contexts]
    outputs = []
    batch = self.scorer.batch_size
    for start in range(0, len(prompts), batch):
      outputs += decode.generate(self.config, self.params, prompts[start:start + batch],
                                 max_new_tokens=max_new, eos_id=self.eot_token_id,
                                 mesh=self.scorer.layout.mesh, rules=self.scorer.layout.rules,
                                 **sampling)
    texts = []
    for ids in outputs:
      if ids and ids[-1] == self.eot_token_id:
        ids = ids[:-1]
      texts.append(lm_utils.postprocess_generated_text(self.tok_decode(ids), until, None))
    return texts

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
    results = [None] * len(requests)
    for indices in groups.values():
      gen_kwargs = requests[indices[0]].args[1]
      texts = self._generate_group([requests[i].args[0] for i in indices], gen_kwargs)
      for i, text in zip(indices, texts):
        results[i] = text
        self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return results
