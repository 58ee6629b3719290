"""Triton kernels of fastdiff, one file per op (installed as the subpackage fastdiff.kernels).

Importing this package needs Triton; fastdiff.backends decides whether it can be used."""
import functools

import torch


def on_tensor_device(launch):
    """Run a launcher with its first tensor's CUDA device current: Triton launches on the current
    device and stream, not on the tensors' device (a tensor on cuda:1 while cuda:0 is current
    would otherwise be handed to a kernel on the wrong GPU)."""
    @functools.wraps(launch)
    def wrapped(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launch(first, *args, **kwargs)
        return launch(first, *args, **kwargs)
    return wrapped
