"""The README's commands are runnable as written.

Every `python -m llm_jax...` command names a real entry point, and each of its flags and
`--config.` overrides exists. The commands themselves run elsewhere on tiny settings (the main
job in main_resume_test, lifecycle_test and multiprocess_test; sample in sample_cli_test;
evaluate in evals_evaluate_test; serve in serving_test; convert in convert_test). The AOT
refusal example runs exactly as written here, since it is the one whose exit status the README
promises; the fitting AOT example compiles a 1B model for minutes, so it is run for
benchmarks/RESULTS.md instead, and aot_test compiles the tiny config for a TPU topology.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lm-eval's own command line (argparse) takes the flags after `run`; lm-eval checks them.
NOT_ABSL = ('llm_jax.evals.lm_eval_cli',)


def _readme_commands() -> list[list[str]]:
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', readme, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      line = line.split(' # ')[0].split('&&')[-1].strip()
      if line.startswith('python -m llm_jax'):
        commands.append(shlex.split(line))
  return commands


def _env() -> dict:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _defined_flags(modules) -> dict:
  """{module: the flags its --helpfull lists}, the modules' processes run side by side."""
  processes = {module: subprocess.Popen([sys.executable, '-m', module, '--helpfull'], cwd=ROOT,
                                        env=_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
               for module in modules}
  return {module: set(re.findall(r'^\s+--(?:\[no\])?([\w.]+)', p.communicate(timeout=300)[0],
                                 re.M))
          for module, p in processes.items()}


def _config_keys(config_arg: str) -> set:
  # The keys do not depend on the config's argument (which may name a directory that exists
  # only on the user's machine, like the README's /ckpt paths).
  path = config_arg.partition(':')[0]
  spec = importlib.util.spec_from_file_location('readme_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()

  def keys(node, prefix=''):
    for key, value in node.items():
      yield prefix + key
      if hasattr(value, 'items'):
        yield from keys(value, prefix + key + '.')

  return set(keys(config))


def test_the_readme_has_commands_for_every_entry_point():
  modules = {command[2] for command in _readme_commands()}
  assert {'llm_jax.main', 'llm_jax.sample', 'llm_jax.aot', 'llm_jax.evaluate', 'llm_jax.serve',
          'llm_jax.convert'} <= modules


def test_every_readme_command_uses_existing_flags_and_config_keys():
  commands = [c for c in _readme_commands() if c[2] not in NOT_ABSL]
  flags_of = _defined_flags({c[2] for c in commands})
  for command in commands:
    module, args = command[2], command[3:]
    assert flags_of[module], f'{module} defines no flags: is it an entry point?'
    names = [a[2:].split('=')[0] for a in args if a.startswith('--')]
    config = next((a.split('=', 1)[1] for a in args if a.startswith('--config=')), None)
    for name in names:
      if name.startswith('config.'):
        assert name[len('config.'):] in _config_keys(config), (command, name)
      else:
        assert name in flags_of[module], (module, name)


@pytest.mark.slow
def test_aot_refusal_example_exits_as_the_readme_says():
  command = next(c for c in _readme_commands()
                 if c[2] == 'llm_jax.aot' and 'configs/llama3_8b.py' in ' '.join(c))
  command[0] = sys.executable
  result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  refusal = result.stderr.strip().splitlines()[-1]
  assert refusal.startswith('does not fit: train step'), refusal
