"""The streaming fleet: Kafka -> RAM++ replicas on Ray -> S3 (fleet, replica, pipeline, Kafka source and
dead letters, offsets, the S3 result sink, the tagging engine, the producer CLI, shutdown).
"""
