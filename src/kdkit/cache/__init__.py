"""Teacher outputs computed once, stored memory-mapped, fingerprinted, and read back by index.

Layout of a cache directory ``path``::

    path/meta.json          shapes, dtypes, top_k, fingerprint, sha256 per array, samples done
    path/logits.npy         dense: [K, N, *S] float32 (or float16); S = per-sample logits shape
    path/topk_logp.npy      top-k: [K, N, *S[:-1], k] log-probabilities (float16 by default)
    path/topk_index.npy            [K, N, *S[:-1], k] class indices (int16 if C < 2**15, else int32)
    path/topk_tail.npy             [K, N, *S[:-1]]    tail mass 1 - sum(top-k probs), float32
    path/feat_000.npy       one array per cached feature path, [K, N, *F]

K is the number of augmented views (``epochs``), N the number of samples, classes are on the
last dim of the logits (so [B, C] classifier logits and [B, L, V] token logits both work).
Each output is ONE contiguous ``.npy`` file opened with ``numpy.load(mmap_mode="r")``; a read
of a batch of indices touches only those rows. Under DDP each rank therefore reads only the
pages of its own samples: open the same cache on every rank (read-only, no locking needed) and
call ``teacher_output(index)`` with the indices of the rank's batch. Build it on one rank only.

A build writes into ``.<name>.partial/`` next to ``path`` and renames it into place when done;
an interrupted build resumes from the blocks whose recorded checksums still match
(:mod:`kdkit.cache.partial`).

A cache is only valid for the teacher weights, the data and the transform it was built from:
``meta.json`` holds a fingerprint of each, and :meth:`TeacherCache.open` refuses a mismatch and
names which part differs. With random augmentation the cache only works through
:class:`SeededViews`, which replays the exact view the teacher saw.

:class:`TokenCache` is the language-model form: per token, the teacher's top-k log-probabilities
and tail mass over variable-length sequences, stored flat without padding (see
:mod:`kdkit.cache.tokens`).
"""

from kdkit.cache.fingerprint import fingerprint_dataset, fingerprint_teacher
from kdkit.cache.store import FORMAT_VERSION, TeacherCache
from kdkit.cache.tokens import TokenCache, TopKTokens
from kdkit.cache.topk import topk_compress, topk_log_compress, topk_reconstruct
from kdkit.cache.views import SeededViews

__all__ = [
    "FORMAT_VERSION",
    "SeededViews",
    "TeacherCache",
    "TokenCache",
    "TopKTokens",
    "fingerprint_dataset",
    "fingerprint_teacher",
    "topk_compress",
    "topk_log_compress",
    "topk_reconstruct",
]
