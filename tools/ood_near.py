#!/usr/bin/env python3
"""The out-of-distribution check on a near case: photos of a rash the detector never saw. Run:
python tools/ood_near.py DATA [--arch mobilenet_v2 --weights IMAGENET1K_V1] [--cache DIR]

DATA is `download`'s layout (train/ val/ test/). The detector is fit, as `train` fits it, on the centre crops
of the train/ photos of one class only (Monkey Pox), then scores the val/ and test/ photos: those of that
class are in distribution, the other class's (Others: chickenpox, measles) are the near out-of-distribution
photos. It prints the ROC AUC of the score between them and the share of each flagged at the threshold.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import monkeypox as mp  # noqa: E402
from mpox.data import read_photos  # noqa: E402
from mpox.features import Extractor  # noqa: E402
from mpox.head import inner_folds  # noqa: E402
from mpox.metrics import roc_auc  # noqa: E402
from mpox.model import resolve_weights  # noqa: E402
from mpox.ood import fit_ood, ood_scores  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('data')
    p.add_argument('--arch', default='mobilenet_v2')
    p.add_argument('--weights', default='IMAGENET1K_V1')
    p.add_argument('--cache', default='')
    args = p.parse_args(argv)
    cache = ['--cache', args.cache] if args.cache else ['--no-cache']
    cfg = mp.parse_args(['train', '--arch', args.arch, '--weights', args.weights, '--precision', 'fp32', *cache])
    classes = ['Monkey Pox', 'Others']
    extractor = Extractor(cfg, classes, resolve_weights(cfg), precision='fp32')
    features = {part: extractor.features(read_photos(str(Path(args.data) / part), classes)[1], ['eval'])[0]
                for part in ('train', 'val', 'test')}
    seen = [i for i, y in enumerate(features['train'].y.tolist()) if y == 0]
    train = features['train'].subset(seen)
    ood = fit_ood(train.x[:, 0], inner_folds(train.photos), cfg.ood_coverage)
    held = [features['val'], features['test']]
    scores = [s for f in held for s in ood_scores(f.x[:, 0], ood).tolist()]
    other = [y == 1 for f in held for y in f.y.tolist()]
    flagged = [s > ood['threshold'] for s in scores]
    share = lambda want: sum(f for f, o in zip(flagged, other) if o == want) / sum(o == want for o in other)  # noqa
    print(f'detector fit on {len(seen)} {classes[0]} training photos; threshold {ood["threshold"]:.3f}')
    print(f'held-out {classes[0]} (in distribution): {share(False):.1%} flagged; {classes[1]} (near out of '
          f'distribution): {share(True):.1%} flagged; ROC AUC {roc_auc(other, scores):.3f}')


if __name__ == '__main__':
    main()
