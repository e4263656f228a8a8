"""The one loop that runs photos through a model: extraction, validation, evaluate and predict."""

import torch
from tqdm import tqdm

from .images import EVAL_VIEW, backbone_input, photo_loader
from .ood import ood_scores
from .precision import inference_model
from .system import gather, is_main, my_chunks


def run_batches(fn, photos, views, cfg, device, pre, desc):
    """This rank's share of `photos`, each decoded once (in decode_workers processes) and cut into its
    `views` (a list of view names per photo), through `fn` (a batch of crops on `device` -> one output
    row per crop) in batches of about --extract-batch-size crops. Yields (indices, outputs, failures) per
    batch: the photos whose crops gave the rows of `outputs` (on the CPU, views in photo order; None when
    there are none) and [index, reason] for each photo that could not be read. Any model plugs in as `fn`."""
    chunks = my_chunks(len(photos), max(1, cfg.extract_batch_size // max(map(len, views), default=1)))
    loader = photo_loader(photos, views, pre, cfg, device, batch_sampler=chunks, workers=len(chunks) > 1)
    with tqdm(total=sum(len(views[i]) for chunk in chunks for i in chunk), desc=desc, unit='crop', leave=False,
              disable=None if is_main() else True) as bar:
        for batch in loader:
            ok, out = [(i, x) for i, x, err in batch if err is None], None
            if ok:
                with torch.inference_mode():
                    out = fn(backbone_input(torch.cat([x for _, x in ok]), device)).cpu()
            bar.update(sum(len(views[i]) for i, _, _ in batch))
            yield [i for i, _ in ok], out, [[i, err] for i, _, err in batch if err]


def score_photos(fn, photos, cfg, device, pre, desc):
    """`fn`'s row for each photo's evaluation view, computed in batches shared among the ranks and gathered:
    ({photo index: row as a list}, sorted [path, reason] of the photos that could not be read)."""
    rows, failures = {}, []
    for done, out, bad in run_batches(fn, photos, [[EVAL_VIEW]] * len(photos), cfg, device, pre, desc):
        rows.update(zip(done, out.tolist() if out is not None else []))
        failures += [[photos[i].path, reason] for i, reason in bad]
    merged, every_failure = {}, []
    for part, fails in gather((rows, failures)):
        merged.update(part)
        every_failure += fails
    return merged, sorted(every_failure)


def classifier(model, device, precision, pre, probs=True, qparams=None, ood=None):
    """A batch of uint8 crops -> class probabilities (or logits): the backbone in its precision (int8 with the
    `qparams` training calibrated), the head in fp32 on the features, exactly as training computes them. With
    an out-of-distribution detector `ood`, each row ends with the photo's score."""
    backbone, head = inference_model(model, device, precision, pre, qparams)
    bank = None if ood is None else {**ood, 'bank': ood['bank'].to(device)}

    def fn(x):
        features = backbone(x).float()
        logits = head(features)
        out = logits.softmax(1) if probs else logits
        return out if bank is None else torch.cat([out, ood_scores(features, bank)[:, None]], 1)
    return fn
