"""Reading inputs: the URI fetchers (s3://, https://, file:// with allowlists and limits), local files,
the official-checkpoint download, sample photos.
"""
