"""Where istiod_lite learns about the cluster: each source yields ``ClusterObjects``."""

from istiod_lite.sources.file import FileSource, LoadResult
from istiod_lite.sources.objects import ClusterObjects, InvalidObject, SourceError
from istiod_lite.sources.validation import ParsedDocuments, parse_documents, validate_object

__all__ = [
    "ClusterObjects",
    "FileSource",
    "InvalidObject",
    "LoadResult",
    "ParsedDocuments",
    "SourceError",
    "parse_documents",
    "validate_object",
]
