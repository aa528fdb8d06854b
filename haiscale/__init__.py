"""haiscale: DDP and FSDP for PyTorch on hfreduce.

Not implemented yet: see the HaiScale issue.
"""
