"""Bulk tagging of S3 buckets with Ray Data: the plan (listing, shards, what is done), the Ray stages (fetch +
decode, tag), the report (shard objects, error reports, the summary) and the driver that runs them.
"""
