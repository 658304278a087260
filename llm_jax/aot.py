"""Entry point: python -m llm_jax.aot --config=CONFIG --topology=v5p-128 (see llm_jax.tools.aot).

Compiles the real train and decode steps for a TPU topology on any host and prints per-chip
memory against HBM; exits non-zero naming the step that does not fit.
"""

import functools

from absl import app
from absl import flags

from llm_jax import cli_errors
from llm_jax import sharding
from llm_jax import model as model_lib
from llm_jax.tools import memory
from llm_jax.tools.aot import check_fits, compile_steps, topology_devices

def _define_flags() -> dict:
  """Flags exist only when this module runs as a program, so importing it defines none (and
  cannot clash with llm_jax.main's --config in one process)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values = dict(
      config=config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config.',
                                             lock_config=True),
      topology=flags.DEFINE_string('topology', 'v5e:2x2', 'TPU topology, e.g. v5e:2x2, v5e-8, '
                                   'v5p-128, v6e-16, or local.'),
      steps=flags.DEFINE_list('steps', ['train', 'decode', 'prefill'], 'Steps to compile: '
                              'train, decode, prefill (the serving engine\'s chunked prefill '
                              'into one decode slot).'),
      decode_batch_size=flags.DEFINE_integer('decode_batch_size', 0,
                                             'Decode batch; default data.global_batch_size.'),
      decode_cache_len=flags.DEFINE_integer('decode_cache_len', 0,
                                            'KV cache length; default data.seq_len.'))
  flags.mark_flags_as_required(['config'])
  return values


def main(argv, flag_values: dict) -> None:
  """Compiles the requested steps and prints one line of memory and FLOPs per step."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, topology = flag_values['config'].value, flag_values['topology'].value
  devices = topology_devices(topology, config.mesh.num_slices)
  model_config = model_lib.from_config_dict(config.model)
  mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, len(devices))
  num_params = model_lib.count_params(model_lib.abstract_params(model_config))
  print(f'{topology}: {len(devices)} x {devices[0].device_kind}; mesh '
        f'{dict(zip(config.mesh.axes, mesh_shape))}; {config.model.preset} '
        f'({num_params / 1e6:,.1f}M params, {model_config.dtype}, remat '
        f'{model_config.remat_policy}, attention {model_config.attention_kernel}); batch '
        f'{config.data.global_batch_size} x {config.data.seq_len}', flush=True)
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes, config.mesh.num_slices,
                              devices=devices)
  batch_shape = (config.data.global_batch_size, config.data.seq_len)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  print(memory.estimate_memory_per_device(model_config, mesh, rules, batch_shape,
                                          accum_steps=config.optim.grad_accum_steps), flush=True)
  reports = compile_steps(config, devices, flag_values['decode_batch_size'].value,
                          flag_values['decode_cache_len'].value,
                          tuple(flag_values['steps'].value))
  for report in reports:
    print(report, flush=True)
  check_fits(reports)


if __name__ == '__main__':
  _FLAG_VALUES = _define_flags()
  cli_errors.run_app(functools.partial(main, flag_values=_FLAG_VALUES))
