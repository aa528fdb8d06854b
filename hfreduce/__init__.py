"""hfreduce: CPU-side allreduce (shared-memory reduce in the node, double binary tree between nodes).

Not implemented yet: see the HFReduce issue.
"""
