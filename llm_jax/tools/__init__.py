"""Tools that need no accelerator: ahead-of-time compilation, FLOPs, memory estimates."""
