"""Teachers other than a live model: the teacher-output cache (dense or top-k), read by `CachedTeacher`.

Every teacher is a callable ``batch -> {"logits": ..., tap: ...}`` (see `kdistill.distiller.LiveTeacher`).
"""

from kdistill.teachers.cache import (CacheSpec, CachedTeacher, augmentation_views, build_cache, cache_key,
                                     cache_key_parts, dataset_fingerprint, open_cache, teacher_fingerprint,
                                     weights_fingerprint)
from kdistill.teachers.store import CacheReader, CacheStore, FieldSpec

__all__ = ["CacheReader", "CacheSpec", "CacheStore", "CachedTeacher", "FieldSpec", "augmentation_views",
           "build_cache", "cache_key", "cache_key_parts", "dataset_fingerprint", "open_cache",
           "teacher_fingerprint", "weights_fingerprint"]
