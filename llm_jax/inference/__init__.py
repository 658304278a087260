"""Inference: prefill and the compiled decode loop, sampling, beam search, generate()."""
