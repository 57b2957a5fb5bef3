"""Where tensors live: device maps over several GPUs and decoder layers streamed from disk."""
