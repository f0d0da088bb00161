import os
import sys

# Shared test helpers (tiny diffusers families, the rank launcher) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TQDM_DISABLE", "1")
