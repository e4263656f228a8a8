"""Messages, errors and the processes of a run: what the user is told (say, warn), the one-line UserError,
and where this process stands among the ranks of a torchrun."""

import argparse
import contextlib
import datetime
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist


NOT_A_DIAGNOSIS = 'Research tool, not a diagnosis: a photo classifier cannot replace a clinician or a PCR test.'


class UserError(Exception):
    """Bad input or usage: reported in one line, exit code 2, no traceback."""


def say(*args, **kwargs):
    """Progress and reports: stdout, or stderr while stdout carries --json output."""
    if not say.muted:
        print(*args, **kwargs, file=sys.stderr if say.to_stderr else sys.stdout, flush=True)


say.to_stderr = say.muted = False


def warn(message):
    if is_main():
        print(f'warning: {message}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet():
    """Silence the per-epoch lines (cv trains many heads and prints one table)."""
    saved, say.muted = say.muted, True
    try:
        yield
    finally:
        say.muted = saved


RANKS = argparse.Namespace(rank=0, world=1, local=0)  # where this process stands under torchrun (0 of 1 without)


def is_main():
    return RANKS.rank == 0


def gather(obj):
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if RANKS.world == 1:
        return [obj]
    out = [None] * RANKS.world
    dist.all_gather_object(out, obj)
    return out


def my_chunks(n, size):
    """This rank's share of range(n) in fixed chunks: chunk k is [k*size, (k+1)*size) and rank r takes chunks
    r, r+W, ...: every item is processed once, in a batch that is the same whatever the number of ranks."""
    chunks = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return chunks[RANKS.rank::RANKS.world]


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs), pin this rank
    to its local GPU, and let only rank 0 speak."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return
    if cfg.command == 'download':
        raise UserError('download runs in one process: use python monkeypox.py download, not torchrun')
    RANKS.rank, RANKS.world, RANKS.local = int(os.environ['RANK']), world, int(os.environ.get('LOCAL_RANK', '0'))
    cuda = cfg.device != 'cpu' and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(RANKS.local)
        cfg.device = f'cuda:{RANKS.local}'
    dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    say.muted = not is_main()


def is_lost_peer(e):
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ('gloo', 'nccl', 'connection', 'timed out',
                                                                      'timeout', 'peer'))


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # `kill` stops a run as Ctrl-C does: what is done is saved, nothing is half-written


@contextlib.contextmanager
def process_state():
    """What main() changes in its process, put back when it returns: the SIGTERM handler, the message
    switches, the torchrun ranks and the global random generators (so that main can run many times in
    one process, as the tests run it)."""
    saved = (signal.getsignal(signal.SIGTERM), say.muted, say.to_stderr, dict(vars(RANKS)),
             torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, saved[0])
        say.muted, say.to_stderr = saved[1], saved[2]
        vars(RANKS).update(saved[3])
        torch.random.set_rng_state(saved[4])
        random.setstate(saved[5])
        np.random.set_state(saved[6])
