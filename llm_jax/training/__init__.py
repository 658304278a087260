"""Training: state and steps, the loop, optimizer, checkpoints, preemption, metrics."""
