"""Bulk tagging of S3 buckets with Ray Data: the plan (listing, shards, what is done) and the run.
"""
