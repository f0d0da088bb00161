import os
import sys

# Shared test helpers (tiny diffusers families, the rank launcher) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TQDM_DISABLE", "1")

# The unit and distributed tiers run on two pytest-xdist workers, which take tests in collection order: the
# longest modules are collected first, so the two workers end together (longest first) instead of one running a
# minute-long test alone at the end while the other idles. The rest keep their order.
LONGEST_FIRST = (
    "test_slurm_multinode.py", "test_vae_training.py", "test_fault_injection.py", "test_planner_memory.py",
    "test_sample_layouts.py",  # distributed
    "test_gpu_suite.py", "test_vae_train.py", "test_scaling.py", "test_ema.py",  # unit
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests stay together
