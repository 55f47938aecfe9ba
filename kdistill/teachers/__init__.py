"""Teachers: live (`LiveTeacher`, frozen, eval mode) and the teacher-output cache (dense or top-k, `CachedTeacher`).

Every teacher is a callable ``batch -> {"logits": ..., tap: ...}`` (see `kdistill.teachers.live`).
"""

from kdistill.teachers.cache import CacheSpec, CachedTeacher, build_cache, cache_key, cache_key_parts, open_cache
from kdistill.teachers.fingerprint import (augmentation_views, dataset_fingerprint, teacher_fingerprint,
                                           weights_fingerprint)
from kdistill.teachers.live import FrozenTeacher, LiveTeacher, freeze
from kdistill.teachers.store import CacheReader, CacheStore, FieldSpec

__all__ = ["CacheReader", "CacheSpec", "CacheStore", "CachedTeacher", "FieldSpec", "FrozenTeacher", "LiveTeacher",
           "freeze", "augmentation_views",
           "build_cache", "cache_key", "cache_key_parts", "dataset_fingerprint", "open_cache",
           "teacher_fingerprint", "weights_fingerprint"]
