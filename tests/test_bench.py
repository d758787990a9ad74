"""The benchmarks run, on the tiny setting, and report finite ratios. They are not timed
tests: no figure is compared with its target here."""
import json
import math

import pytest


@pytest.fixture(scope="module", autouse=True)
def bench_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("bench")
    mp.setenv("TRANSPLANT_BENCH_DIR", str(root))
    yield root
    mp.undo()


def finite(res) -> None:
    assert res.figures
    for f in res.figures:
        assert f.ratios and all(math.isfinite(r) for r in f.ratios), f


def test_setup_builds_tiny_once(bench_dir):
    from bench import setup

    paths = setup.ensure("tiny", quiet=True)
    assert setup.is_ready("tiny") and paths["donor"].parent == paths["donor_root"]
    stamp = (paths["target"] / "model.safetensors").stat().st_mtime_ns
    setup.ensure("tiny", quiet=True)
    assert (paths["target"] / "model.safetensors").stat().st_mtime_ns == stamp   # idempotent


def test_pick_modules_spreads_distinct_names():
    from bench.common import pick_modules
    from tiny import make_model
    from transplant_core.arch import build_table

    table = build_table(make_model("llama", 0))
    names = pick_modules(table, 8)
    assert len(set(names)) == 8 and {n.split(".")[1] for n in names} == {"0", "1"}


@pytest.mark.parametrize("name, extra", [
    ("swap", ["--repeats", "1", "--breakdown"]),
    ("throughput", ["--requests", "4", "--clients", "1,4"]),
    ("swap_load", ["--duration", "1.5", "--clients", "4"]),
    ("lae_cost", ["--repeats", "1", "--prompts", "2"]),
    ("memory", []),
    ("soak", ["--cycles", "4"]),
    ("continuous", ["--repeats", "1", "--mixed-range", "8,64", "--http-requests", "2"]),
    ("fleet", ["--repeats", "1"]),
    ("apply", ["--repeats", "1"]),
])
def test_benchmark_runs_on_tiny(name, extra, tmp_path, capsys):
    import importlib

    out = tmp_path / "r.json"
    res = importlib.import_module(f"bench.{name}").main(["--quick", *extra, "--json", str(out)])
    finite(res)
    data = json.loads(out.read_text())
    assert data["bench"] == name and data["figures"][0]["target"]
    assert "median" in capsys.readouterr().out


def test_closing_table_lists_every_figure():
    from bench.run_all import table

    md = table([{"bench": "swap", "command": "python -m bench.swap --json x",
                 "figures": [{"figure": "swap / reload", "target": "<= 0.05", "median": 0.5, "min": 0.4,
                              "max": 0.6, "met": False}]}])
    assert "| swap: swap / reload | <= 0.05 | 0.5 | 0.4 | 0.6 | **no** | `python -m bench.swap` |" in md
