"""One training run: the head on stored features, fine-tuning with --unfreeze, validation and the best
epoch."""

import contextlib
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import CLASS_MAP_NAME, RESUME_NAME, write_class_map, write_summary
from .devices import autocast, resolve_device
from .files import atomic_write, torch_save
from .head import HEAD_GRID, RowSpace, fit_temperature, newton_softmax, on_grid_edge, search_weight_decay
from .images import backbone_input, normalize, photo_loader, preprocessing
from .inference import classifier, score_photos
from .metrics import calibration, metrics
from .model import freeze, head_name, trainable_state
from .precision import resolve_precision
from .system import UserError, gather, is_main, muted, rank, say, warn, world


class Run:
    """One training run. What the fit functions read: the settings, the model (a full model, or cv's bare
    head on stored features), the training features (random views) and validation features (evaluation
    view), the classes, and a resumed run's state. What they leave here: the per-epoch history and
    progress lines, and the best epoch (copied, never referenced); with a `checkpoint` path, the atomic
    best checkpoint and the resume file too."""

    def __init__(self, cfg, model, train, val, classes, positive, meta=None, checkpoint=None, precision=None):
        self.cfg, self.model, self.train, self.val = cfg, model, train, val
        self.classes, self.positive, self.meta, self.resume = classes, positive, meta, None
        self.head_fit, self.cache_dir = {}, None  # the head's fit (fit_head); where its search is kept
        self.oof_logits = None  # the inner folds' out-of-fold logits of the training views, tempered (fit_head)
        self.device = resolve_device(cfg.device)
        # the arithmetic the features were settled in (pipeline.prepare), which fine-tuning keeps
        self.precision = precision or resolve_precision(cfg.precision, self.device)
        self.history, self.best, self.best_written = [], None, None
        self.last_write = time.time()  # fast (head) epochs: the best is written once, at the end
        # only rank 0 writes files; every rank keeps the same history and best (their numbers are equal)
        self.checkpoint = checkpoint if checkpoint and is_main() else None

    def end_epoch(self, stage, epoch, epochs, train_stats, val, optimizer, seconds, threshold=None):
        """Record an epoch, print its line, keep it if it is the best, and save what a resume needs.
        `threshold`: the one to carry when there are no validation photos to choose it on."""
        row = {'stage': stage, 'epoch': epoch, 'train_loss': train_stats['loss'], 'train_accuracy':
               train_stats['accuracy'], 'val_loss': val['metrics']['loss'] if val else float('nan'),
               'val_accuracy': val['metrics']['accuracy'] if val else float('nan'),
               'val_balanced_accuracy': val['metrics']['balanced_accuracy'] if val else float('nan'),
               'seconds': seconds}
        self.history.append(row)
        improved = val is not None and (self.best is None or (val['metrics']['balanced_accuracy'],
                                                             -val['metrics']['loss']) > tuple(self.best['score']))
        if val is None or improved:  # with no validation photos the last epoch is the model
            self.best = {'stage': stage, 'epoch': epoch, 'state': trainable_state(self.model),
                         'score': [val['metrics']['balanced_accuracy'], -val['metrics']['loss']] if val else [],
                         'metrics': val['operating'] if val else {},
                         'threshold': val['threshold'] if val else threshold or self.cfg.threshold}
        v = (f' | val loss {row["val_loss"]:.3f} acc {row["val_accuracy"]:.3f} bal {row["val_balanced_accuracy"]:.3f}'
             if val else '')
        say(f'{stage} epoch {epoch:3d}/{epochs} | train loss {row["train_loss"]:.3f} acc {row["train_accuracy"]:.3f}'
            f'{v} | {seconds:.2f}s{" *" if improved else ""}')
        if self.checkpoint:
            if self.best is not self.best_written and time.time() - self.last_write >= self.cfg.checkpoint_seconds:
                self.write_best()
            torch_save({'format': 'monkeypox.py resume', 'fingerprint': self.meta['fingerprint'], 'stage': stage,
                        'epoch': epoch, 'trainable': trainable_state(self.model), 'history': self.history,
                        'optimizer': optimizer.state_dict() if optimizer else None, 'head': self.head_fit,
                        'best': dict(self.best)}, os.path.join(self.cfg.out, RESUME_NAME))

    def restore(self, resume):
        self.resume, self.history, self.best, self.best_written = resume, resume['history'], resume['best'], None
        self.head_fit = resume['head']

    def probabilities(self, f):
        """Class probabilities of the photos of `f` from their evaluation view, and the same before the
        head's temperature scaling: the head on the stored features while the backbone is frozen, the whole
        model on the photos once it was fine-tuned (one pass; its probabilities have no temperature)."""
        if self.cfg.unfreeze:
            probs = photo_logits(self, f.photos).softmax(1).tolist()
            return probs, probs
        with torch.no_grad():
            logits = self.model.get_submodule(head_name(self.model))(f.x[:, 0].float())
        # the head's weights carry 1/temperature: multiplying by it undoes the scaling
        return logits.softmax(1).tolist(), (logits * self.head_fit['temperature']).softmax(1).tolist()

    def write_best(self, final=False):
        # the final write always happens: the checkpoint's history must be the whole run's, not the
        # history as it stood when the best epoch was last written
        if not self.checkpoint or self.best is None or (self.best is self.best_written and not final):
            return
        state = self.model.state_dict()
        state.update(self.best['state'])
        b = self.best
        ckpt = {**self.meta, 'model': {k: v.detach().cpu() for k, v in state.items()}, 'epoch': b['epoch'],
                'stage': b['stage'], 'threshold': b['threshold'], 'metrics': b['metrics'], 'history': self.history,
                'head': {k: v for k, v in self.head_fit.items() if k != 'scale'}}
        torch_save(ckpt, self.checkpoint)
        write_class_map(ckpt['classes'], os.path.join(os.path.dirname(self.checkpoint), CLASS_MAP_NAME))
        self.best_written, self.last_write = self.best, time.time()

    def finish(self):
        self.write_best(final=True)
        if self.checkpoint:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.cfg.out, RESUME_NAME))
            write_summary(self.history, os.path.join(self.cfg.out, 'summary.csv'))
            atomic_write(os.path.join(self.cfg.out, 'config.json'),
                         lambda f: f.write(json.dumps(self.meta['config'], indent=1).encode()))

    def save_interrupted(self):
        """Ctrl-C or kill: the best epoch so far is written (complete, or not at all) before stopping."""
        saved = (f'best checkpoint so far (epoch {self.best["epoch"]}) in {self.checkpoint}' if self.best else
                 'no checkpoint yet')
        with contextlib.suppress(Exception):
            self.write_best()
        say(f'interrupted: {saved}; resume with --resume')


def fit(run):
    """Train run.model: the head on the stored features, then with --unfreeze the last stages on freshly
    augmented photos. The model leaves at its best epoch, which is returned."""
    if not (run.resume and run.resume['stage'] == 'finetune'):
        fit_head(run)
    if run.cfg.unfreeze:  # fine-tuning starts from the converged head (the last epoch), not an early best
        finetune(run)
    run.model.load_state_dict(run.best['state'], strict=False)
    return run.best


def fit_head(run):
    """The new head, fit to convergence on every training photo's stored views: the mean cross-entropy plus
    lambda/2 |W|^2 (bias free) on features standardised over those views, lambda being --weight-decay or,
    with 'auto', the choice of grouped inner cross-validation (search_weight_decay). Its logits are then
    divided by the temperature that best fits the inner folds' out-of-fold predictions (frozen backbone only:
    fine-tuning moves the model those predictions measured). Standardisation and temperature are folded into
    the saved Linear, so the checkpoint stays a plain torchvision state_dict and predict needs nothing more.
    Validation photos serve the report and the threshold, never the fit."""
    cfg, t0 = run.cfg, time.time()
    x, y = run.train.x.flatten(0, 1).double(), run.train.y.repeat_interleave(run.train.x.shape[1])
    auto, tune = cfg.weight_decay == 'auto', not len(run.val.y) and cfg.target_sensitivity > 0
    search = search_weight_decay(run, HEAD_GRID if auto else (float(cfg.weight_decay),))
    if search is None and (auto or tune):
        raise UserError(('--weight-decay auto' if auto else '--target-sensitivity without validation photos') +
                        ' needs two patients of every class or more among the training photos (inner folds by '
                        'patient); add photos' + (', or pass --weight-decay NUMBER (e.g. 1)' if auto else ''))
    lam = search['choice'] if search else float(cfg.weight_decay)
    edge = on_grid_edge(search) if auto else None
    if edge and not muted():  # cv's folds and the fidelity check fit quietly: cv says it once
        warn(f'weight decay {lam:g} is the {edge} of the {len(search["grid"])} tried ({search["grid"][0]:g} to '
             f'{search["grid"][-1]:g}): the inner folds found no best penalty inside the grid, so a value beyond it may '
             'fit better; pass --weight-decay NUMBER to try one')
    oof = torch.tensor(search['oof_logits'], dtype=torch.float64) if search else None
    space = RowSpace(x)
    weight, bias = space.linear(newton_softmax(space.a, y, len(run.classes), lam))
    temperature = 1.0 if cfg.unfreeze or search is None else fit_temperature(oof.flatten(0, 1), y)
    run.oof_logits = None if oof is None else oof.flatten(0, 1) / temperature  # the head's logits on unseen photos
    head = run.model.get_submodule(head_name(run.model))
    with torch.no_grad():
        head.weight.copy_(weight / temperature)
        head.bias.copy_(bias / temperature)
        logits = head(x.float())
    run.head_fit = {'weight_decay': lam, 'auto': auto, 'scale': space.std.float(), 'temperature': temperature,
                'search': {k: v for k, v in search.items() if k != 'oof_logits'} if auto else None}
    threshold = cfg.threshold
    if search and run.positive is not None:
        truth = [v == run.positive for v in run.train.y.tolist()]
        oof_p = [(oof / t).softmax(2).mean(1)[:, run.positive].tolist() for t in (1.0, temperature)]  # views averaged
        run.head_fit['ece'] = {'before': calibration(truth, oof_p[0])['ece'], 'after': calibration(truth, oof_p[1])['ece']}
        if tune:
            threshold = select_threshold(truth, oof_p[1], cfg.target_sensitivity, cfg.threshold)
    val = validate(lambda: head(run.val.x[:, 0].float()), run.val.y, run.classes, run.positive,
                   cfg) if len(run.val.y) else None
    say(head_line(run.head_fit, search, cfg.unfreeze) + f'; {len(x)} views of {len(run.train.y)} photos, '
        f'{time.time() - t0:.2f}s')
    stats = {'loss': F.cross_entropy(logits, y).item(), 'accuracy': (logits.argmax(1) == y).float().mean().item()}
    run.end_epoch('head', 1, 1, stats, val, None, time.time() - t0, threshold)


def head_line(fit, search, unfreeze):
    """The head's line: its penalty and how it was chosen, and its temperature with what that did."""
    line = f'head: weight decay {fit["weight_decay"]:g}'
    if fit['auto']:
        loss = search['loss'][search['grid'].index(fit['weight_decay'])]
        line += f', chosen by {search["folds"]} inner folds by patient (out-of-fold log loss {loss:.3f})'
    else:
        line += ' (given)'
    if search and not unfreeze:
        line += f'; temperature {fit["temperature"]:.2f}'
        if 'ece' in fit:
            line += f' (out-of-fold ECE {fit["ece"]["before"]:.3f} -> {fit["ece"]["after"]:.3f})'
    return line


def validate(logits_fn, y, classes, positive, cfg):
    """Validation metrics at --threshold ('metrics': they pick the best epoch and fill the history), the
    threshold the checkpoint will carry (--threshold, or the highest reaching --target-sensitivity) and
    the metrics at that threshold ('operating': stored, so they are what `evaluate` reports on the same
    photos). Epochs are compared at the fixed threshold: comparing them at a threshold tuned on the same
    photos picks epochs whose tuning flatters them (docs/method.md)."""
    with torch.no_grad():
        logits = logits_fn()
    loss = F.cross_entropy(logits, y).item()
    probs = logits.softmax(1)
    threshold = cfg.threshold
    if positive is not None and cfg.target_sensitivity > 0:
        threshold = select_threshold((y == positive).tolist(), probs[:, positive].tolist(), cfg.target_sensitivity,
                                     cfg.threshold)
    m, at = (metrics(y.tolist(), probs.tolist(), classes, positive, t) for t in (cfg.threshold, threshold))
    m['loss'] = at['loss'] = loss
    return {'metrics': m, 'threshold': threshold, 'operating': at}


def finetune(run):
    """Fine-tune the last --unfreeze stages and the head: Adam with --backbone-lr for the stages and LR
    for the head, on-the-fly RandomResizedCrop + flip (a new crop of every photo each epoch), BatchNorm
    in inference mode throughout (Keras's advice for small data: its statistics stay ImageNet's).
    Under torchrun: DistributedDataParallel, each rank a DistributedSampler share of every batch."""
    cfg, model, device = run.cfg, run.model, run.device
    head, stages = freeze(model, cfg.unfreeze)
    for k, v in model.named_parameters():  # the best so far (head stage) must carry these stages' weights too
        if v.requires_grad and k not in run.best['state']:
            run.best['state'][k] = v.detach().clone()
    model.to(device).to(memory_format=torch.channels_last)
    net = frozen_folded(model) if run.precision == 'fp32' else model
    net = net if world() == 1 else nn.parallel.DistributedDataParallel(  # gradients averaged across ranks
        net, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = torch.optim.Adam([{'params': list(head.parameters()), 'lr': cfg.lr},
                                  {'params': [p for s in stages for p in s.parameters()], 'lr': cfg.backbone_lr}])
    # one sampler for one process or many: its seeded permutation makes the global batches the same
    sampler = torch.utils.data.DistributedSampler(range(len(run.train.photos)), num_replicas=world(),
                                                  rank=rank(), shuffle=True, seed=cfg.seed)
    base_lrs, per_rank = [g['lr'] for g in optimizer.param_groups], max(1, cfg.batch_size // world())
    steps = math.ceil(len(sampler) / per_rank)  # per epoch, the same on every rank
    start = 1
    if run.resume and run.resume['stage'] == 'finetune':
        model.load_state_dict(run.resume['trainable'], strict=False)
        optimizer.load_state_dict(run.resume['optimizer'])
        start = run.resume['epoch'] + 1
    pre, scale = preprocessing(cfg), run.head_fit['scale'].to(device)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        photos = [run.train.photos[i] for i in sampler]
        # a crop named by the epoch: reproducible, so --resume and every rank see the same pixels
        loader = photo_loader(photos, [[f'finetune{epoch}']] * len(photos), pre, cfg, device, batch_size=per_rank)
        total, correct, seen = 0.0, 0, 0
        for step, batch in enumerate(tqdm(loader, desc=f'finetune epoch {epoch}', unit='batch', leave=False,
                                          disable=None if is_main() else True)):
            factor = finetune_lr_factor((epoch - 1) * steps + step, steps, cfg.epochs)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group['lr'] = lr * factor
            bad = [err for _, _, err in batch if err]
            if bad:  # read fine moments ago, when its features were extracted
                raise UserError(f'{bad[0]} (it changed during training); fix it and run again with --resume')
            x = normalize(backbone_input(torch.cat([x for _, x, _ in batch]), device), pre)
            y = torch.tensor([photos[i].label for i, _, _ in batch], device=device)
            with autocast(device, run.precision):
                logits = net(x).float()
            loss = F.cross_entropy(logits, y)  # and the head's penalty, as it was fit: on standardised features
            loss = loss + run.head_fit['weight_decay'] / 2 * (head.weight * scale).square().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        total, correct, seen = map(sum, zip(*gather((total, correct, seen))))
        val = validate(lambda: photo_logits(run, run.val.photos), run.val.y, run.classes, run.positive,
                       cfg) if len(run.val.y) else None
        run.end_epoch('finetune', epoch, cfg.epochs, {'loss': total / max(seen, 1),
                      'accuracy': correct / max(seen, 1)}, val, optimizer, time.time() - t0)
    model.cpu()


def frozen_folded(model):
    """The model to fine-tune in fp32 with each frozen convolution + BatchNorm pair folded into one convolution
    (exact: BatchNorm stays in inference mode), traced with torch.fx. The trainable stages are the model's
    own modules, so the optimizer and the checkpoint see what training changes; a model torch.fx cannot
    trace is used as it is."""
    try:
        graph = torch.fx.symbolic_trace(model)
    except Exception:
        return model
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        conv = node.args[0] if node.op == 'call_module' and isinstance(modules[node.target], nn.BatchNorm2d) else None
        if conv is None or conv.op != 'call_module' or not isinstance(modules[conv.target], nn.Conv2d) or \
                len(conv.users) > 1 or any(p.requires_grad for p in [*modules[conv.target].parameters(),
                                                                     *modules[node.target].parameters()]):
            continue
        name = conv.target.replace('.', '_') + '_folded'  # a module of its own: the model's stays as it is
        graph.add_module(name, torch.nn.utils.fusion.fuse_conv_bn_eval(modules[conv.target], modules[node.target]))
        conv.target = name
        node.replace_all_uses_with(conv)
        graph.graph.erase_node(node)
    graph.recompile()
    return graph


def finetune_lr_factor(step, steps_per_epoch, epochs):
    """Learning-rate multiplier at a fine-tuning step: linear warm-up over the first epoch (Adam's first
    steps are large next to pretrained weights), then cosine decay to zero at the last step."""
    if step < steps_per_epoch:
        return (step + 1) / steps_per_epoch
    rest = max(1, steps_per_epoch * (epochs - 1))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - steps_per_epoch) / rest)))


def photo_logits(run, photos):
    """Logits of the whole model (as it is now) on the photos' evaluation view, in batches shared among
    the ranks."""
    pre = preprocessing(run.cfg)
    rows, failures = score_photos(classifier(run.model, run.device, run.precision, pre, probs=False), photos, run.cfg,
                                  run.device, pre, 'validate')
    if failures:  # read fine moments ago, when its features were extracted
        raise UserError(f'{failures[0][1]} (it changed during training); fix it and run again')
    return torch.tensor([rows[i] for i in range(len(photos))]) if photos else torch.zeros(0, 0)


def select_threshold(y_pos, p_pos, target, fallback):
    """Highest threshold t with sensitivity (share of positives with p >= t) of at least `target`
    (`fallback` when there are no positives to measure it on)."""
    scores = sorted((p for y, p in zip(y_pos, p_pos) if y), reverse=True)
    if not scores:
        return fallback
    k = max(1, math.ceil(target * len(scores) - 1e-9))
    return float(scores[min(k, len(scores)) - 1])
