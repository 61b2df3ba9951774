"""The local real stack and what runs against it.

`stack` installs, starts and stops Kafka (KRaft), Redis and s3proxy on loopback (also a script:
`python3 infra/local/stack.py up`); `kit` holds the small helpers the tests, the demo and the benches share.
Everyone imports them the same way, `from infra.local import kit, stack`, with the repository root on
`sys.path` (pytest's `pythonpath`; the demo and bench scripts add it).
"""
