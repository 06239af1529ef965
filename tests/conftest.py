import os

os.environ.setdefault("DIFFMIX_QUIET", "1")
