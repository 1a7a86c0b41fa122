"""source_version: a digest of what is under the data URI now (keys, sizes, ETags).

Never cached itself; preprocess takes its output as an input, so preprocess's cache key
changes when the bucket's content changes, even though ``data_uri`` stays the same.
"""


def source_version(data_uri: str) -> str:
    from thaw.storage import source_version as version_of

    return version_of(data_uri)
