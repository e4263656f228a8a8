"""Messages, errors and the processes of a run: what the user is told (say, warn), the one-line UserError,
and where this process stands among the ranks of a torchrun."""

import contextlib
import contextvars
import datetime
import os
import random
import signal
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist


NOT_A_DIAGNOSIS = 'Research tool, not a diagnosis: a photo classifier cannot replace a clinician or a PCR test.'


class UserError(Exception):
    """Bad input or usage: reported in one line, exit code 2, no traceback."""


MUTED = contextvars.ContextVar('mpox.muted', default=False)        # quiet(): per-epoch lines of cv's folds
TO_STDERR = contextvars.ContextVar('mpox.to_stderr', default=False)  # messages_to_stderr(): while stdout is JSON


def say(*args, **kwargs):
    """Progress and reports, from rank 0 only: stdout, or stderr while stdout carries --json output."""
    if not MUTED.get() and is_main():
        print(*args, **kwargs, file=sys.stderr if TO_STDERR.get() else sys.stdout, flush=True)


def warn(message):
    if is_main():
        print(f'warning: {message}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def scoped(var, value):
    """A context variable set for the block, and put back after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def quiet():
    """Silence `say` in the block (cv trains many heads and prints one table)."""
    return scoped(MUTED, True)


def muted():
    return MUTED.get()


def messages_to_stderr(on=True):
    """`say` writes to stderr in the block, so that stdout carries only the --json output."""
    return scoped(TO_STDERR, on)


@contextlib.contextmanager
def environment(**variables):
    """Environment variables set for the block (None: left as they are), and put back after it."""
    saved = {k: os.environ.get(k) for k, v in variables.items() if v is not None}
    os.environ.update({k: v for k, v in variables.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def hidden_warnings(*rules):
    """The warnings matching one of `rules`, (category, the start of the message as a regex), hidden in the
    block; every other warning is shown as usual."""
    with warnings.catch_warnings():
        for category, message in rules:
            warnings.filterwarnings('ignore', message=message, category=category)
        yield


def first_line(e):
    """An exception's message in one line (its type's name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def rank():
    """This process's rank under torchrun, 0 without: the process group, when there is one, is the state."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world():
    """The number of ranks: 1 without torchrun."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    return rank() == 0


def gather(obj):
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def my_chunks(n, size):
    """This rank's share of range(n) in fixed chunks: chunk k is [k*size, (k+1)*size) and rank r takes chunks
    r, r+W, ...: every item is processed once, in a batch that is the same whatever the number of ranks."""
    chunks = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return chunks[rank()::world()]


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs) and pin this rank
    to its local GPU. Only rank 0 speaks (say)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return
    if cfg.command == 'download':
        raise UserError('download runs in one process: use python monkeypox.py download, not torchrun')
    local = int(os.environ.get('LOCAL_RANK', '0'))
    cuda = cfg.device != 'cpu' and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        cfg.device = f'cuda:{local}'
    dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(seconds=cfg.dist_timeout))


def is_lost_peer(e):
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ('gloo', 'nccl', 'connection', 'timed out',
                                                                      'timeout', 'peer'))


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # `kill` stops a run as Ctrl-C does: what is done is saved, nothing is half-written


@contextlib.contextmanager
def process_state():
    """What a run changes in its process, put back when it ends: the SIGTERM handler, the process group of a
    torchrun, and the global random generators that building models seeds (so that main can run many times
    in one process, as the tests run it, and leave its caller's generators as they were)."""
    saved = (signal.getsignal(signal.SIGTERM), torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, saved[0])
        torch.random.set_rng_state(saved[1])
        random.setstate(saved[2])
        np.random.set_state(saved[3])
