"""Runs absl entry points so that a misspelled config override is one line, not a traceback.

ml_collections reports `--config.optim.lerning_rate=1` as a KeyError raised while absl parses
the flags, three chained exceptions deep. `run_app` parses the flags itself and turns that case
into `SystemExit('unknown config key optim.lerning_rate; did you mean optim.learning_rate?')`:
one line on stderr and exit status 1. Other errors propagate unchanged.
"""

import difflib
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import app
from absl import flags
import ml_collections


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of --name=VALUE or --name VALUE in argv (the last one wins), else None."""
  value = None
  for i, arg in enumerate(argv):
    for prefix in (f'--{name}', f'-{name}'):
      if arg.startswith(prefix + '='):
        value = arg[len(prefix) + 1:]
      elif arg == prefix and i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
  """The dotted config paths overridden on the command line (--name.a.b=v, --noname.a.b)."""
  paths = []
  for arg in argv:
    flag = arg.lstrip('-').split('=', 1)[0]
    for prefix in (f'{name}.', f'no{name}.'):
      if arg.startswith('-') and flag.startswith(prefix):
        paths.append(flag[len(prefix):])
  return paths


def _config_paths(config: ml_collections.ConfigDict, prefix: str = '') -> Iterator[str]:
  """Every key of a config, sections included, as dotted paths."""
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _config_paths(value, f'{prefix}{key}.')


def _node(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """The value at a dotted path that exists ('' is the config itself)."""
  for part in filter(None, dotted.split('.')):
    config = config[part]
  return config


def _missing_prefix(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
  """The first part of `path` (as a dotted prefix) that the config lacks, or None."""
  node = config
  parts = path.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return '.'.join(parts[:depth + 1])
    node = node[part]
  return None


def _closest(word: str, candidates, cutoff: float) -> Optional[str]:
  matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
  return matches[0] if matches else None


def _suggestion(config: ml_collections.ConfigDict, path: str, missing: str) -> Optional[str]:
  """A known path close to `path`: a sibling of the missing part, else the same leaf name in
  another section (train.async_save -> checkpoint.async_save)."""
  parent, _, part = missing.rpartition('.')
  siblings = _node(config, parent)
  if isinstance(siblings, ml_collections.ConfigDict):
    sibling = _closest(part, siblings.keys(), cutoff=0.6)
    if sibling is not None:
      candidate = '.'.join(filter(None, (parent, sibling, path[len(missing) + 1:])))
      if _missing_prefix(config, candidate) is None:
        return candidate
  known = list(_config_paths(config))
  leaf = _closest(path.rpartition('.')[2], {p.rpartition('.')[2] for p in known}, cutoff=0.8)
  return next((p for p in known if leaf is not None and p.rpartition('.')[2] == leaf), None)


def unknown_key_message(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
  """'unknown config key a.b; did you mean a.c?' if `path` is not in the config, else None."""
  missing = _missing_prefix(config, path)
  if missing is None:
    return None
  suggestion = _suggestion(config, path, missing)
  if suggestion is not None:
    return f'unknown config key {path}; did you mean {suggestion}?'
  parent = missing.rpartition('.')[0]
  node = _node(config, parent)
  if not isinstance(node, ml_collections.ConfigDict):
    return f'unknown config key {path}; {parent} is a value, not a section'
  return f'unknown config key {path}; {parent or "the config"} has {", ".join(sorted(node))}'


def _explain_unknown_override(argv: Sequence[str], config_flag: str) -> Optional[str]:
  """The one-line message for the first override naming no config key, if there is one."""
  source = _flag_value(argv, config_flag)
  if source is None:
    return None
  config = flags.FLAGS[config_flag].parser.parse(source)
  for path in _override_paths(argv, config_flag):
    message = unknown_key_message(config, path)
    if message is not None:
      return message
  return None


def parse_flags(argv: Sequence[str], config_flag: str = 'config') -> list[str]:
  """absl's flag parsing, with an unknown `--config.x.y` override as a one-line SystemExit."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    message = _explain_unknown_override(argv, config_flag)
    if message is None:
      raise
    raise SystemExit(message) from error


def run_app(main: Callable[[list[str]], Any], config_flag: str = 'config') -> None:
  """`absl.app.run(main)` for an entry point that defines a config-file flag `config_flag`."""
  app.run(main, flags_parser=lambda argv: parse_flags(argv, config_flag))
