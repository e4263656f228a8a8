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

from .files import safe_torch_load, torch_save
from .images import load_rgb
from .system import UserError

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
    against) of its mirror image, and the grey thumbnail (long side THUMB, or less)."""
    points: np.ndarray       # float32 [n, 2], in pixels of the photo scaled to `side`
    descriptors: np.ndarray  # uint8 [n, 32]
    thumb: np.ndarray        # uint8 [h, w]
    side: int                # long side of the photo as its keypoints were found
    mirror: tuple = None     # (points, descriptors) of the mirror image

    def to_thumb(self):
        """Thumbnail pixels per keypoint pixel."""
        return max(self.thumb.shape) / self.side

    def stored(self, mirror=True):
        """As tensors (torch.load's weights_only reads them back): the feature cache keeps the mirror image's
        keypoints, a checkpoint (mirror=False) only the photo's own, in float16 (about 20 KB a photo)."""
        d = {'points': torch.from_numpy(self.points.astype(np.float16)),
             'descriptors': torch.from_numpy(self.descriptors), 'thumb': torch.from_numpy(self.thumb),
             'side': self.side}
        if mirror and self.mirror is not None:
            d['mirror'] = [torch.from_numpy(self.mirror[0].astype(np.float16)), torch.from_numpy(self.mirror[1])]
        return d


def from_stored(d):
    mirror = d.get('mirror')
    return Signature(d['points'].float().numpy(), d['descriptors'].numpy(), d['thumb'].numpy(), d['side'],
                     None if mirror is None else (mirror[0].float().numpy(), mirror[1].numpy()))


CACHE_NAME = 'near-duplicates.pt'


def load_signatures(folder):
    """{sha256: Signature} kept in the feature cache `folder` by an earlier run ({} without one)."""
    path = os.path.join(folder, CACHE_NAME) if folder else ''
    if not path or not os.path.exists(path):
        return {}
    try:
        return {sha: from_stored(d) for sha, d in safe_torch_load(path, 'near-duplicate cache').items()}
    except (UserError, KeyError, AttributeError, TypeError):
        return {}  # a damaged cache is computed again


def save_signatures(folder, cache):
    if folder:
        with contextlib.suppress(UserError):  # a cache that cannot be written is computed again next time
            torch_save({sha: s.stored() for sha, s in cache.items() if s is not None}, os.path.join(folder, CACHE_NAME))


def opencv():
    import cv2  # imported where used: only the search needs OpenCV
    return cv2


def signature(path):
    """The photo's Signature; None when it cannot be read (the extraction reports those)."""
    cv = opencv()
    try:
        grey = load_rgb(path, draft=SIDE).convert('L')
    except Exception:
        return None
    side = min(SIDE, max(grey.size))  # never enlarged: that adds no detail, and costs time
    big, thumb = np.array(scaled(grey, side)), np.array(scaled(grey, min(THUMB, side)))
    points, descriptors = keypoints(cv, big)
    return Signature(points, descriptors, thumb, side, keypoints(cv, np.ascontiguousarray(big[:, ::-1])))


def scaled(grey, side):
    w, h = grey.size
    s = side / max(w, h)
    return grey.resize((max(1, round(w * s)), max(1, round(h * s))), resample=2)  # bilinear


def keypoints(cv, grey):
    # a low FAST threshold: skin is smooth, and a copy only needs to share some of the keypoints found
    orb = cv.ORB_create(nfeatures=KEYPOINTS, nlevels=SCALES, edgeThreshold=15, fastThreshold=5)
    found, descriptors = orb.detectAndCompute(cv.equalizeHist(grey), None)
    if descriptors is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.float32([k.pt for k in found]), descriptors


def signatures(photos, cache=None):
    """Signature of each photo (None: unreadable), from `cache` ({sha256: Signature}) where it has them, the
    others computed and added to it."""
    cache = {} if cache is None else cache
    todo = list({p.sha: p.path for p in photos if p.sha not in cache}.items())
    with concurrent.futures.ThreadPoolExecutor(threads()) as pool:  # OpenCV and Pillow release the GIL
        for (sha, _), sig in zip(todo, pool.map(signature, [path for _, path in todo])):
            cache[sha] = sig
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
    return np.sqrt(rows), (rows > 0).sum(0)


def candidates(queries, references, same):
    """Pairs (query index, reference index) worth confirming: each query's CANDIDATES nearest references by
    tf-idf cosine of visual words, and (`same`: one set of photos) each reference's nearest queries."""
    q, q_df = word_vectors(queries, mirrored=True)
    r, r_df = (q, q_df) if same else word_vectors(references, mirrored=False)
    n = len(references) + (0 if same else len(queries))
    idf = np.log((n + 1) / (r_df + (0 if same else q_df) + 1)).astype(np.float32)
    q, r = normalised(q * idf), normalised(r * idf)
    k = min(CANDIDATES, len(references) - (1 if same else 0))
    pairs = set()
    if k <= 0:
        return pairs
    for start in range(0, len(queries), CHUNK):
        sim = q[start:start + CHUNK] @ r.T
        if same:
            np.fill_diagonal(sim[:, start:], -1)  # not itself
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        for i, row in enumerate(nearest, start):
            pairs.update((min(i, j), max(i, j)) if same else (i, j) for j in row.tolist() if j != i or not same)
    return pairs


def normalised(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def confirm(a, b):
    """(keypoint matches, correlation) of `a`, or its mirror image, placed on `b` by the similarity transform
    that explains most of their matched keypoints; (0, 0.0) when none does."""
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
        # the same transform between the thumbnails: out of a's keypoint pixels, into b's thumbnail pixels
        on_thumbs = transform * b.to_thumb()
        on_thumbs[:, :2] /= a.to_thumb()
        thumb = a.thumb[:, ::-1] if flip else a.thumb
        best = max(best, (int(inliers.sum()), correlation(cv, thumb, b.thumb, on_thumbs)), key=lambda t: t[1])
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
    [(query index, reference index, keypoint matches, correlation)], each pair once, in index order."""
    same = references is None
    references = queries if same else references
    qi = [i for i, s in enumerate(queries) if s is not None]
    ri = qi if same else [i for i, s in enumerate(references) if s is not None]
    q, r = [queries[i] for i in qi], [references[i] for i in ri]
    pairs = sorted(candidates(q, r, same))
    with concurrent.futures.ThreadPoolExecutor(threads()) as pool:  # OpenCV releases the GIL
        confirmed = pool.map(lambda pair: confirm(q[pair[0]], r[pair[1]]), pairs)
    return [(qi[a], ri[b], matches, round(corr, 4)) for (a, b), (matches, corr) in zip(pairs, confirmed)
            if is_copy(matches, corr)]


def is_copy(matches, corr):
    """Whether a pair's keypoint matches and correlation (confirm) make it a copy (measured: docs/data.md)."""
    return matches >= MIN_INLIERS and corr >= (FEW_CORRELATION if matches < FEW_INLIERS else MIN_CORRELATION)


def threads():
    return max(1, min(4, os.cpu_count() or 1))


def joined_groups(n, pairs):
    """Connected groups (sorted lists of indices 0..n-1) of more than one member, joining pair to pair."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, *_ in pairs:
        parent[find(a)] = find(b)
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)
