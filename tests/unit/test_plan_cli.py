"""`cogvx plan`: every layout it lists fits the memory it was given (90% of it, the rest for workspaces and
fragmentation) by the planner's own estimate, uses all the GPUs, and comes in order of predicted step time; more
memory admits more layouts; recompute and the distributed optimizer trade memory as they should; bad input is
one line, exit 2."""
from __future__ import annotations

import json

import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main


def plan(capsys, *args):
    assert main(["plan", "--preset", "cogvideox-5b", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_listed_layouts_fit_use_every_gpu_and_are_ranked(capsys):
    result = plan(capsys, "--gpus", "8", "--gpu-mem", "80")
    layouts = result["layouts"]
    assert 0 < len(layouts) < result["considered"]
    for layout in layouts:
        assert layout["memory_gib"] <= 0.9 * 80
        assert layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"] == 8
    times = [layout["step_seconds"] for layout in layouts]
    assert times == sorted(times)
    # the same layout with and without the distributed optimizer: the same time, less memory with it
    by_key = {}
    for layout in layouts:
        key = (layout["tp"], layout["pp"], layout["vpp"], layout["cp"], layout["recompute"])
        by_key.setdefault(key, {})[layout["distributed_optimizer"]] = layout
    pairs = [pair for pair in by_key.values() if len(pair) == 2]
    assert pairs and all(p[True]["memory_gib"] < p[False]["memory_gib"] for p in pairs)
    assert all(p[True]["step_seconds"] == p[False]["step_seconds"] for p in pairs)
    bigger = plan(capsys, "--gpus", "8", "--gpu-mem", "141")
    assert len(bigger["layouts"]) > len(layouts)


def test_full_recompute_costs_time_and_saves_memory(capsys):
    layouts = plan(capsys, "--gpus", "8", "--gpu-mem", "1000")["layouts"]
    same = {(l["tp"], l["pp"], l["vpp"], l["cp"], l["distributed_optimizer"], l["recompute"]): l for l in layouts}
    compared = 0
    for key, layout in same.items():
        if key[-1] == "none" and key[:-1] + ("full",) in same:
            full = same[key[:-1] + ("full",)]
            assert full["memory_gib"] < layout["memory_gib"] and full["step_seconds"] > layout["step_seconds"]
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("args, needle", [(["--gpus", "8", "--gpu-mem", "80", "--size", "480"], "HEIGHTxWIDTH"),
                                          (["--gpus", "0", "--gpu-mem", "80"], "--gpus"),
                                          (["--gpus", "1", "--gpu-mem", "1"], "no layout")])
def test_bad_plan_input_is_one_line_exit_2(capsys, args, needle):
    assert main(["plan", "--preset", "cogvideox-5b", *args]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error
