"""What this machine computes fast: the device, bf16 units, PyTorch's x86 int8 kernels."""

import os
import platform

import torch


def resolve_device(device):
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)


def fast_bf16():
    """Whether this CPU runs bf16 natively (AVX-512 bf16 or AMX) and oneDNN may use it."""
    fast = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() or \
        getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()  # oneDNN held below its bf16 units emulates bf16
    return fast and any(k in isa for k in ('BF16', 'FP16', 'AMX', 'AVX10', 'ALL'))


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


def int8_engine():
    """'x86' where PyTorch's own int8 kernels for x86 CPUs (fbgemm and oneDNN, VNNI and AMX when present) are
    there, else None (ARM, or a torch without them)."""
    x86 = platform.machine().lower() in ('x86_64', 'amd64')
    return 'x86' if x86 and 'x86' in torch.backends.quantized.supported_engines else None
