"""Reading and writing (possibly sharded) safetensors checkpoints one tensor at a time.

Reading memory-maps each tensor straight from its file instead of going through
`safe_open(framework='numpy')`, which cannot represent bfloat16, or the flax loader, which would
place every tensor on the default accelerator. A tensor is therefore copied exactly once, into
the array the caller allocated for it. Writing uses `safetensors.numpy`, which stores ml_dtypes'
bfloat16 as BF16.
"""

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping, Optional

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy

from llm_jax import cloud_paths

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Floating dtypes a Llama checkpoint may hold; anything else (int8, fp8, float64) is refused.
DTYPES = {
    'F32': np.dtype('<f4'),
    'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: file, dtype, shape and byte offset of its data."""
  name: str
  filename: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int

  def read(self) -> np.ndarray:
    """Read-only memory map of the tensor (pages are read only when copied); on cloud storage,
    which cannot be mapped, the tensor's byte range is read."""
    if math.prod(self.shape) == 0:  # np.memmap cannot map zero bytes; a scalar () has one
      return np.zeros(self.shape, self.dtype)
    if cloud_paths.is_cloud(self.filename):
      with epath.Path(self.filename).open('rb') as f:
        f.seek(self.offset)
        data = f.read(math.prod(self.shape) * self.dtype.itemsize)
      return np.frombuffer(data, self.dtype).reshape(self.shape)
    return np.memmap(self.filename, dtype=self.dtype, mode='r', offset=self.offset,
                     shape=self.shape)


def read_header(filename: str) -> dict[str, TensorInfo]:
  """Parses one .safetensors file's header into TensorInfo by tensor name."""
  size = epath.Path(filename).stat().length
  with epath.Path(filename).open('rb') as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f'{filename} is not a safetensors file (shorter than its 8-byte prefix)')
    (header_len,) = struct.unpack('<Q', prefix)
    if header_len > min(_HEADER_LIMIT, size - 8):
      raise ValueError(f'{filename} is not a safetensors file (header length {header_len})')
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{filename} has an unreadable safetensors header: {e}') from e
  data_start = 8 + header_len
  tensors = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    if entry['dtype'] not in DTYPES:
      raise ValueError(f'tensor {name!r} in {filename} has dtype {entry["dtype"]}; supported: '
                       f'{sorted(DTYPES)}')
    dtype, shape = DTYPES[entry['dtype']], tuple(int(d) for d in entry['shape'])
    begin, end = entry['data_offsets']
    if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
      raise ValueError(f'tensor {name!r} in {filename}: data_offsets {entry["data_offsets"]} do '
                       f'not fit its shape {list(shape)} and dtype {entry["dtype"]}, or the file '
                       'is truncated')
    tensors[name] = TensorInfo(name, filename, dtype, shape, data_start + begin)
  return tensors


def index_directory(directory: str) -> dict[str, TensorInfo]:
  """TensorInfo for every tensor of a checkpoint directory (single file or sharded with index)."""
  index_path = epath.Path(directory) / INDEX_FILE
  single_path = epath.Path(directory) / SINGLE_FILE
  # transformers also prefers the single file when both are present.
  if single_path.exists():
    return read_header(os.fspath(single_path))
  if index_path.exists():
    weight_map = json.loads(index_path.read_text()).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index_path} has no "weight_map" object')
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      path = epath.Path(directory) / shard
      if not path.exists():
        raise FileNotFoundError(f'{index_path} names shard {shard}, which does not exist')
      shard_tensors = read_header(os.fspath(path))
      duplicated = sorted(set(shard_tensors) & set(tensors))
      if duplicated:
        raise ValueError(f'tensors {duplicated[:5]} appear in {shard} and in another shard')
      tensors.update(shard_tensors)
    for name, shard in weight_map.items():
      if name not in tensors or os.path.basename(tensors[name].filename) != shard:
        raise ValueError(f'{index_path} maps tensor {name!r} to {shard}, which does not hold it')
    unlisted = sorted(set(tensors) - set(weight_map))
    if unlisted:
      raise ValueError(f'shards in {directory} hold tensors missing from {INDEX_FILE}: '
                       f'{unlisted[:5]}')
    return tensors
  found = (sorted(p.name for p in epath.Path(directory).iterdir())
           if epath.Path(directory).is_dir() else [])
  raise FileNotFoundError(f'no {SINGLE_FILE} or {INDEX_FILE} in {directory} (found {found}); '
                          'only safetensors checkpoints are supported')


# A tensor to write: its name, shape, dtype, and a function producing its (contiguous) data.
TensorSource = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def _plan_shards(sources: list[TensorSource], max_shard_bytes: int) -> list[list[TensorSource]]:
  shards, current, current_bytes = [], [], 0
  for source in sources:
    nbytes = math.prod(source[1]) * np.dtype(source[2]).itemsize
    if current and current_bytes + nbytes > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(source)
    current_bytes += nbytes
  return shards + [current] if current else shards


def write_checkpoint(directory: str, sources: Iterable[TensorSource], max_shard_bytes: int,
                     metadata: Optional[Mapping[str, str]] = None) -> list[str]:
  """Writes tensors as model.safetensors, or as numbered shards plus an index when they exceed
  `max_shard_bytes`. Only one shard's tensors are materialised at a time.

  Returns:
    The names of the files written.
  """
  sources = list(sources)
  shards = _plan_shards(sources, max_shard_bytes)
  metadata = dict(metadata or {'format': 'pt'})
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map, total_size = {}, 0
  for shard_name, shard in zip(names, shards):
    arrays = {}
    for name, shape, dtype, produce in shard:
      array = np.ascontiguousarray(produce())
      if array.shape != tuple(shape) or array.dtype != dtype:
        raise ValueError(f'tensor {name!r} came out as {array.dtype}{list(array.shape)}, '
                         f'expected {np.dtype(dtype)}{list(shape)}')
      arrays[name] = array
      weight_map[name] = shard_name
      total_size += array.nbytes
    shard_path = epath.Path(directory) / shard_name
    if cloud_paths.is_cloud(shard_path):  # no local file to write to: upload the bytes
      shard_path.write_bytes(safetensors_numpy.save(arrays, metadata=metadata))
    else:
      safetensors_numpy.save_file(arrays, os.fspath(shard_path), metadata=metadata)
    del arrays
  if len(shards) > 1:
    (epath.Path(directory) / INDEX_FILE).write_text(json.dumps(
        {'metadata': {'total_size': total_size}, 'weight_map': weight_map}, indent=2))
    names.append(INDEX_FILE)
  return names
