"""The distributed tier runs on two pytest-xdist workers (the Makefile's `-n 2`), which take tests in collection
order. Its longest modules are collected first, so the two workers end together (longest first) instead of one
running a minute-long test alone at the end while the other idles. The rest keep their order."""
from __future__ import annotations

LONGEST_FIRST = ("test_slurm_multinode.py", "test_vae_training.py", "test_fault_injection.py",
                 "test_planner_memory.py", "test_sample_layouts.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's tests stay together
