import os
import sys

# Shared test helpers (tiny diffusers families, the rank launcher) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TQDM_DISABLE", "1")

# The distributed tier runs on two pytest-xdist workers, which take tests in collection order: its longest
# modules are collected first, so the two workers end together (longest first) instead of one running a
# minute-long test alone at the end while the other idles. The rest keep their order. Not the unit tier: its
# long tests run torch in-process, and two of them at once on 2 cores (oversubscribed OpenMP threads) took 3x
# as long in CI (the 200-step VAE test: 222 s against 71 s).
LONGEST_FIRST = ("test_slurm_multinode.py", "test_vae_training.py", "test_fault_injection.py",
                 "test_planner_memory.py", "test_sample_layouts.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests stay together


def pytest_configure(config):
    """One intra-op thread in each xdist worker, and in what it starts: two workers share two cores, and a worker
    whose torch ran an OpenMP pool of two beside the other worker's spun its threads against it (oversubscribed;
    a test then took up to 3x as long). Set before the test modules import torch."""
    if hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)
