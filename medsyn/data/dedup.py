"""Exact and near-duplicate detection (MediSyn Methods 4.1 credits de-duplication for its absence of
memorisation); duplicates are found within and across sources and reported with the file they repeat.

Exact duplicates share the SHA-256 of their pixels. Near duplicates are found in two steps: a 64-bit
DCT perceptual hash (imagehash.phash) proposes candidates within `max_hash_bits`, and the Pearson
correlation of 16 x 16 grey thumbnails confirms them. The hash alone is not enough for medical
images: two different patients' CT slices in the same window, or two slices of one MRI volume, often
hash within a few bits of each other, while a re-encoded or re-exposed copy keeps a thumbnail
correlation above 0.999 (0.9998 for the embedded corpus's planted copy, while slices of
different patients stay below 0.995).
"""

import hashlib

import imagehash
import numpy as np
from PIL import Image

THUMBNAIL = 16


def pixel_sha256(image: np.ndarray) -> str:
    """SHA-256 of the pixel array (shape and dtype included), independent of the file format."""
    digest = hashlib.sha256()
    digest.update(str((image.shape, image.dtype.str)).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of the image in grey, as an int."""
    return int(str(imagehash.phash(Image.fromarray(image).convert("L"))), 16)


def thumbnail_vector(image: np.ndarray) -> np.ndarray:
    """Grey 16 x 16 box-filtered thumbnail, mean-centred and scaled to unit norm (float32), so that the
    dot product of two vectors is their Pearson correlation."""
    thumb = Image.fromarray(image).convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    v = np.asarray(thumb, dtype=np.float64).ravel()
    v -= v.mean()
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else v).astype(np.float32)


class DuplicateIndex:
    """Incremental index: `check` returns how an image repeats an earlier one, or None.

    The hash comparison is one vectorised XOR + popcount over all kept hashes, fine for ~10^5 images;
    beyond that a multi-index hash would be needed.

    Args:
        min_correlation: thumbnail correlation at or above which a hash candidate is a near
            duplicate; None turns near-duplicate detection off.
        max_hash_bits: perceptual-hash Hamming distance within which images are candidates.
    """

    def __init__(self, min_correlation: float | None = 0.995, max_hash_bits: int = 10):
        self.min_correlation = min_correlation
        self.max_hash_bits = max_hash_bits
        self._exact: dict[str, str] = {}
        self._hashes = np.zeros(1024, dtype=np.uint64)
        self._thumbs = np.zeros((1024, THUMBNAIL * THUMBNAIL), dtype=np.float32)
        self._ids: list[str] = []

    def check(self, item_id: str, image: np.ndarray) -> tuple[str, str] | None:
        """Return ('exact_duplicate' | 'near_duplicate', id of the first image) or None; a new image is remembered."""
        sha = pixel_sha256(image)
        if sha in self._exact:
            return "exact_duplicate", self._exact[sha]
        n = len(self._ids)
        phash = np.uint64(perceptual_hash(image))
        thumb = thumbnail_vector(image)
        if self.min_correlation is not None and n:
            candidates = np.flatnonzero(np.bitwise_count(self._hashes[:n] ^ phash) <= self.max_hash_bits)
            if candidates.size:
                correlation = self._thumbs[candidates] @ thumb
                best = int(np.argmax(correlation))
                if correlation[best] >= self.min_correlation:
                    return "near_duplicate", self._ids[candidates[best]]
        self._exact[sha] = item_id
        if n == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
            self._thumbs = np.concatenate([self._thumbs, np.zeros_like(self._thumbs)])
        self._hashes[n] = phash
        self._thumbs[n] = thumb
        self._ids.append(item_id)
        return None
