"""Plots training runs: python -m llm_jax.plot WORKDIR [WORKDIR...] [--out=FILE].

One workdir: writes its loss, learning-rate and evaluation curves to WORKDIR/plots/. Several:
overlays their training and evaluation losses in one PNG, by default `comparison.png` in the
directory that holds them all. Works while the runs are still training.
"""

import os
import sys

from absl import app
from absl import flags

from llm_jax.training import plots

_OUT = flags.DEFINE_string('out', None, 'PNG file for several runs (default: comparison.png in '
                           'their common directory); directory for one run (default: '
                           'WORKDIR/plots).')


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError('give one or more training workdirs')
  try:
    if len(workdirs) == 1:
      paths = plots.write_run_plots(workdirs[0], _OUT.value)
    else:
      out = _OUT.value or os.path.join(
          os.path.commonpath([os.path.abspath(w) for w in workdirs]), 'comparison.png')
      paths = [plots.write_comparison(workdirs, out)]
  except (FileNotFoundError, ValueError) as e:  # a wrong path or a damaged file: one line
    sys.exit(f'llm_jax.plot: {e}')
  for path in paths:
    print(path)


if __name__ == '__main__':
  app.run(main)
