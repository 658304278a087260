"""Which keys each query may see: causal by position index, and within its own segment."""


def make_attention_mask(q_index, kv_index, q_segment_ids=None, kv_segment_ids=None):
  """Boolean mask [B, T, S]: causal by index, and same-segment when segment ids are given.

  Index and segment arrays are [B, T] / [B, S]; a batch dimension of 1 broadcasts.
  """
  mask = kv_index[:, None, :] <= q_index[:, :, None]
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask
