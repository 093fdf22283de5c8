"""Every utils module imports on a CPU-only machine without pulling in vLLM, flash-attn, Liger or wandb: those are
imported inside the functions that need them (STYLE.md), so the package works where they are missing or broken."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("vllm", "flash_attn", "liger_kernel", "wandb")

# Run in a fresh interpreter: the test session itself has long since imported vLLM and friends.
CHECK = r"""
import importlib, json, sys
forbidden, modules = sys.argv[1].split(","), sys.argv[2:]
pulled_in = {}
for name in modules:
    before = set(sys.modules)
    importlib.import_module(name)
    new = {m.split(".")[0] for m in set(sys.modules) - before}
    hits = sorted(new & set(forbidden))
    if hits:
        pulled_in[name] = hits
print(json.dumps({"pulled_in": pulled_in, "loaded": sorted(set(forbidden) & {m.split(".")[0] for m in sys.modules})}))
"""


def _import_in_fresh_process(modules: list[str], forbidden: tuple[str, ...], extra_path: str = "") -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # a CPU-only machine, as far as torch knows
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", CHECK, ",".join(forbidden), *modules], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def utils_modules() -> list[str]:
    """utils/*.py and utils/benchmarks/*.py as module names, each package before its modules (utils.judges and
    utils.benchmarks import each other: only the package-first order resolves)."""
    files = sorted((REPO / "utils").glob("*.py")) + sorted((REPO / "utils" / "benchmarks").glob("*.py"))
    names = [".".join(f.relative_to(REPO).with_suffix("").parts) for f in files]
    packages = [n.removesuffix(".__init__") for n in names if n.endswith(".__init__")]
    return packages + [n for n in names if not n.endswith(".__init__")]


def test_no_utils_module_imports_optional_heavy_packages_at_the_top():
    modules = utils_modules()
    assert {"utils", "utils.inference", "utils.vllm_engine", "utils.doc_attention", "utils.metrics_logger",
            "utils.benchmarks"} <= set(modules)
    out = _import_in_fresh_process(modules, FORBIDDEN)
    assert out["pulled_in"] == {} and out["loaded"] == [], out


def test_the_check_names_the_module_that_pulls_a_package_in(tmp_path):
    """The check above can fail: a module with a top-level import of a forbidden package is named."""
    (tmp_path / "heavy_stand_in").mkdir()
    (tmp_path / "heavy_stand_in" / "__init__.py").write_text("")
    (tmp_path / "light_module.py").write_text("import json\n")
    (tmp_path / "careless_module.py").write_text("import heavy_stand_in.sub\n")
    (tmp_path / "heavy_stand_in" / "sub.py").write_text("")
    out = _import_in_fresh_process(["light_module", "careless_module"], ("heavy_stand_in",), str(tmp_path))
    assert out == {"pulled_in": {"careless_module": ["heavy_stand_in"]}, "loaded": ["heavy_stand_in"]}
