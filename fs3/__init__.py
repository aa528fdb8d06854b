"""fs3: 3FS-style storage (cluster manager, metadata, CRAQ storage servers, client, FUSE mount).

Not implemented yet: see the fs3 issues.
"""
