"""Near-duplicates: copies of one photo (turned a quarter or mirrored, cropped to half its area or more,
rescaled, recoloured, blurred, re-encoded, renamed) found whatever their names, so that they join one
patient and no split or fold has a photo on one side and its copy on the other.

A whole-image hash does not survive a crop that moves the content, and one threshold on backbone features
does not tell copies from look-alike photos, so the search has two steps (docs/data.md):
1. candidates: each photo's ORB keypoints (Rublee et al. 2011: rotation-invariant binary descriptors, of the
   photo and of its mirror image) counted as visual words, tf-idf weighted; the CANDIDATES most similar
   photos by cosine, in matrix products over chunks of photos: no pair is compared in Python;
2. confirmation: descriptors matched (Lowe's ratio test), a similarity transform fitted by RANSAC, and the
   two grey thumbnails correlated at that transform. Measured on MSLD and two strong copies of each photo
   (docs/data.md): all 456 copies match their original with 14 keypoints or more and correlate at 0.946
   or more; of 3,630 pairs of different photos none reaches 8 matches.
"""
import concurrent.futures
import contextlib
import dataclasses
import os

import numpy as np
import torch

from .data import connected
from .files import safe_torch_load, torch_save
from .images import load_rgb
from .system import UserError, gather, my_chunks

SIDE = 256            # long side (pixels) keypoints are found at: larger photos are scaled down to it
KEYPOINTS = 300       # ORB keypoints kept per photo
SCALES = 8            # ORB's pyramid levels, each 1.2 times smaller: a copy may be cropped to a third of the side
THUMB = 96            # long side of the grey thumbnail the confirmation correlates (or the photo's, if less)
WORD_BITS = 12        # a visual word: 12 of a descriptor's 256 bits ...
WORD_TABLES = 4       # ... in 4 fixed random choices of bits
CANDIDATES = 3        # most similar photos by visual words that each photo is confirmed against
MIN_INLIERS = 10      # keypoint matches the fitted transform must explain (chance lines up 8 on skin's texture)
MIN_CORRELATION = 0.5  # grey-level correlation of the thumbnails at that transform (a photo published twice and
FEW_INLIERS = 20      # reprocessed: 0.55 at 46 matches); with fewer matches than FEW_INLIERS the correlation
FEW_CORRELATION = 0.8  # must reach FEW_CORRELATION (two different photos: 0.57 at 17 matches; copies: 0.93 or more)
MIN_OVERLAP = 0.3     # share of a photo's thumbnail the other must cover there
CHUNK = 1024          # photos per matrix product of the candidate search


@dataclasses.dataclass
class Signature:
    """What the search keeps of a photo: keypoints and descriptors found with its long side at `side`
    pixels (SIDE, or less for a smaller photo), of the photo and (for photos searched, not only searched
    against) of its mirror image, and the grey thumbnail (long side THUMB, or less; None in a checkpoint,
    which keeps no pixels of its training photos)."""
    points: np.ndarray       # float32 [n, 2] (float16 values), in pixels of the photo scaled to `side`
    descriptors: np.ndarray  # uint8 [n, 32]
    thumb: np.ndarray        # uint8 [h, w], or None
    side: int                # long side of the photo as its keypoints were found
    mirror: tuple = None     # (points, descriptors) of the mirror image

    def to_thumb(self):
        """Thumbnail pixels per keypoint pixel."""
        return max(self.thumb.shape) / self.side

    def stored(self, pixels=True):
        """As tensors (torch.load's weights_only reads them back): the cache keeps it whole; a checkpoint
        (pixels=False) only the keypoints and descriptors of the photo itself (about 10 KB a photo)."""
        d = {'points': torch.from_numpy(self.points.astype(np.float16)),
             'descriptors': torch.from_numpy(self.descriptors), 'side': self.side}
        if pixels:
            d['thumb'] = torch.from_numpy(self.thumb)
            if self.mirror is not None:
                d['mirror'] = [torch.from_numpy(self.mirror[0].astype(np.float16)), torch.from_numpy(self.mirror[1])]
        return d


def from_stored(d):
    thumb, mirror = d.get('thumb'), d.get('mirror')
    return Signature(d['points'].float().numpy(), d['descriptors'].numpy(), thumb if thumb is None else thumb.numpy(),
                     d['side'], None if mirror is None else (mirror[0].float().numpy(), mirror[1].numpy()))


CACHE_NAME = 'near-duplicates.pt'
SETTINGS = {'side': SIDE, 'keypoints': KEYPOINTS, 'scales': SCALES, 'thumb': THUMB}  # what a cached signature depends on


def load_signatures(folder):
    """{sha256: Signature} kept in the feature cache `folder` by an earlier run with these settings ({} else)."""
    path = os.path.join(folder, CACHE_NAME) if folder else ''
    if not path or not os.path.exists(path):
        return {}
    try:
        kept = safe_torch_load(path, 'near-duplicate cache')
        if kept.get('settings') != SETTINGS:
            return {}
        return {sha: from_stored(d) for sha, d in kept['signatures'].items()}
    except (UserError, KeyError, AttributeError, TypeError):
        return {}  # a damaged cache is computed again


def save_signatures(folder, cache):
    if folder:
        with contextlib.suppress(UserError):  # a cache that cannot be written is computed again next time
            torch_save({'settings': SETTINGS, 'signatures': {sha: s.stored() for sha, s in cache.items() if s}},
                       os.path.join(folder, CACHE_NAME))


def opencv():
    try:
        import cv2  # imported where used: only the search needs OpenCV
    except ImportError as e:
        raise UserError('the near-duplicate search needs OpenCV (opencv-python-headless): pip install -r '
                        'requirements.txt, or pass --near-duplicates off') from e
    return cv2


def grey_photo(path):
    """The photo in grey, its long side at most SIDE; None when it cannot be read (the extraction reports
    those). Called in one thread: load_rgb's warning filter (decompression bombs) is the process's."""
    try:
        grey = load_rgb(path, draft=SIDE).convert('L')
    except Exception:
        return None
    return scaled(grey, min(SIDE, max(grey.size)))  # never enlarged: that adds no detail, and costs time


def signature(grey):
    """The Signature of a grey photo (grey_photo), or None for none."""
    if grey is None:
        return None
    cv, big = opencv(), np.array(grey)
    thumb = np.array(scaled(grey, min(THUMB, max(grey.size))))
    points, descriptors = keypoints(cv, big)
    return Signature(points, descriptors, thumb, max(grey.size), keypoints(cv, np.ascontiguousarray(big[:, ::-1])))


def scaled(grey, side):
    w, h = grey.size
    s = side / max(w, h)
    return grey.resize((max(1, round(w * s)), max(1, round(h * s))), resample=2)  # bilinear


def keypoints(cv, grey):
    """ORB's keypoints (rounded to float16, as the cache and checkpoints keep them: the same answer from a
    cache as from the photo) and descriptors; none on a photo too small for the pyramid."""
    # a low FAST threshold: skin is smooth, and a copy only needs to share some of the keypoints found
    orb = cv.ORB_create(nfeatures=KEYPOINTS, nlevels=SCALES, edgeThreshold=15, fastThreshold=5)
    try:
        found, descriptors = orb.detectAndCompute(cv.equalizeHist(grey), None)
    except cv.error:  # a side of a few pixels shrinks to none in the pyramid
        found, descriptors = (), None
    if descriptors is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.float16([k.pt for k in found]).astype(np.float32), descriptors


def signatures(photos, cache=None):
    """Signature of each photo (None: unreadable), from `cache` ({sha256: Signature}) where it has them, the
    others computed, a share on each rank under torchrun, gathered and added to it: decoded one after
    another, their keypoints found in threads (OpenCV releases the GIL)."""
    cache = {} if cache is None else cache
    todo = list({p.sha: p.path for p in photos if p.sha not in cache}.items())
    mine = [todo[i] for chunk in my_chunks(len(todo), 16) for i in chunk]
    greys = [grey_photo(path) for _, path in mine]
    with concurrent.futures.ThreadPoolExecutor(threads()) as pool:
        computed = dict(zip([sha for sha, _ in mine], pool.map(signature, greys)))
    for part in gather(computed):
        cache.update(part)
    return [cache[p.sha] for p in photos]


def word_vectors(sigs, mirrored):
    """Each signature's visual words as a float32 row of square-rooted counts (a texture that repeats counts
    less; the words of the mirror image too when `mirrored`), and the words' document counts."""
    rng = np.random.default_rng(0)  # fixed: the same words in every run and every checkpoint
    choice = [rng.choice(256, WORD_BITS, replace=False) for _ in range(WORD_TABLES)]
    width, weights = 1 << WORD_BITS, 1 << np.arange(WORD_BITS)
    rows = np.zeros((len(sigs), WORD_TABLES * width), np.float32)
    for i, s in enumerate(sigs):
        parts = [s.descriptors] + ([s.mirror[1]] if mirrored and s.mirror else [])
        bits = np.unpackbits(np.concatenate(parts), axis=1)
        for t, columns in enumerate(choice):
            rows[i] += np.bincount(t * width + bits[:, columns] @ weights, minlength=rows.shape[1])
    counts = (rows > 0).sum(0)
    return np.sqrt(rows, out=rows), counts


def candidates(queries, references=None):
    """Pairs (query index, reference index) worth confirming, in order: each query's CANDIDATES nearest
    references by tf-idf cosine of visual words, and (no `references`: one set of photos, each pair once)
    each photo's nearest photos. Entries that are None are skipped."""
    same = references is None
    qi = [i for i, s in enumerate(queries) if s is not None]
    ri = qi if same else [i for i, s in enumerate(references) if s is not None]
    q, q_df = word_vectors([queries[i] for i in qi], mirrored=True)
    r, r_df = (q, q_df) if same else word_vectors([references[i] for i in ri], mirrored=False)
    idf = np.log((len(ri) + (0 if same else len(qi)) + 1) / (r_df + (0 if same else q_df) + 1)).astype(np.float32)
    for x in (q,) if same else (q, r):  # in place: a row is 64 KB
        x *= idf
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    k = min(CANDIDATES, len(ri) - (1 if same else 0))
    pairs = set()
    for start in range(0, len(qi), CHUNK) if k > 0 else ():
        sim = q[start:start + CHUNK] @ r.T
        if same:
            np.fill_diagonal(sim[:, start:], -1)  # not itself
        for a, row in enumerate(np.argpartition(-sim, k - 1, axis=1)[:, :k], start):
            pairs.update((min(a, b), max(a, b)) if same else (a, b) for b in row.tolist())
    return sorted((qi[a], ri[b]) for a, b in pairs)


def confirm(a, b):
    """(keypoint matches, correlation) of `a`, or its mirror image, placed on `b` by the similarity transform
    that explains most of their matched keypoints: the orientation judged the more surely a copy. The
    correlation is None when either has no thumbnail (a checkpoint's); (0, 0.0) when no transform fits."""
    cv = opencv()
    best = (0, 0.0)
    for flip, (points, descriptors) in enumerate([(a.points, a.descriptors)] + ([a.mirror] if a.mirror else [])):
        if len(descriptors) < 4 or len(b.descriptors) < 4:
            continue
        matches = cv.BFMatcher(cv.NORM_HAMMING).knnMatch(descriptors, b.descriptors, k=2)
        good = [m[0] for m in matches if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
        if len(good) < MIN_INLIERS:
            continue
        transform, inliers = cv.estimateAffinePartial2D(points[[m.queryIdx for m in good]],
                                                        b.points[[m.trainIdx for m in good]],
                                                        method=cv.RANSAC, ransacReprojThreshold=4.0)
        if transform is None or inliers.sum() < MIN_INLIERS:
            continue
        corr = None
        if a.thumb is not None and b.thumb is not None:
            # the same transform between the thumbnails: out of a's keypoint pixels, into b's thumbnail pixels
            on_thumbs = transform * b.to_thumb()
            on_thumbs[:, :2] /= a.to_thumb()
            corr = correlation(cv, a.thumb[:, ::-1] if flip else a.thumb, b.thumb, on_thumbs)
        best = max(best, (int(inliers.sum()), corr), key=lambda t: (is_copy(*t), t[0] if t[1] is None else t[1]))
    return best


def correlation(cv, a, b, transform):
    """Correlation of thumbnail `a` carried onto thumbnail `b` by `transform`, over the part of `b` it covers
    (0 when that is under MIN_OVERLAP) less a band of 2 pixels along a's edges, where the interpolation
    mixes in the black outside. Both slightly blurred: JPEG blocks and resampling differ."""
    m = transform.astype(np.float32)
    h, w = b.shape
    moved = cv.warpAffine(a.astype(np.float32), m, (w, h), flags=cv.INTER_LINEAR)
    inside = cv.warpAffine(np.ones(a.shape, np.float32), m, (w, h), flags=cv.INTER_LINEAR) > 0.999
    covered = cv.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8), borderValue=1) > 0
    if covered.mean() < MIN_OVERLAP:
        return 0.0
    x = cv.GaussianBlur(moved, (0, 0), 0.7)[covered]
    y = cv.GaussianBlur(b.astype(np.float32), (0, 0), 0.7)[covered]
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-6))


def near_duplicates(queries, references=None):
    """Confirmed copies among `queries` (Signatures; None entries skipped), or of `references` among them:
    [(query index, reference index, keypoint matches, correlation)], each pair once, in index order; the
    correlation None where a checkpoint's signature has no thumbnail. The candidates are the same on every
    rank under torchrun, and each rank confirms its share."""
    pairs = candidates(queries, references)
    mine = [pairs[i] for chunk in my_chunks(len(pairs), 64) for i in chunk]
    others = queries if references is None else references
    with concurrent.futures.ThreadPoolExecutor(threads()) as pool:  # OpenCV releases the GIL
        checked = pool.map(lambda pair: confirm(queries[pair[0]], others[pair[1]]), mine)
        found = [(a, b, matches, corr if corr is None else round(corr, 4))
                 for (a, b), (matches, corr) in zip(mine, checked) if is_copy(matches, corr)]
    return sorted(f for part in gather(found) for f in part)


def is_copy(matches, corr):
    """Whether a pair's keypoint matches and correlation (confirm) make it a copy (measured: docs/data.md).
    Without a correlation (a checkpoint keeps no thumbnails) FEW_INLIERS matches are needed."""
    if corr is None:
        return matches >= FEW_INLIERS
    return matches >= MIN_INLIERS and corr >= (FEW_CORRELATION if matches < FEW_INLIERS else MIN_CORRELATION)


def threads():
    return max(1, min(4, os.cpu_count() or 1))


def joined_groups(n, pairs):
    """Connected groups (sorted lists of indices 0..n-1) of more than one member, joining pair to pair."""
    group = connected(n, [pair[:2] for pair in pairs])
    members = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    return sorted(m for m in members.values() if len(m) > 1)
