"""The performance model of context-parallel attention (no process group needed):

- `workload`: document lengths (the one resolution rule, packaged default) and packing.
"""
