"""What a base install (`pip install opd`, or scripts/demo.sh's `.[demo]`) can import.

CI installs every extra, so a module-level import of an optional package in a path the
base install runs (`opd train`, `opd generate`, `opd demo`) passes every other test and
fails on a user's machine: `opd demo` from a fresh clone stopped with "No module named
'httpx'" once (the remote scorer imported at module level by the cache generator). Here the
optional packages are made unimportable in a fresh interpreter, and those paths imported.
"""

import subprocess
import sys
import textwrap

# the extras of pyproject.toml other than `demo` (matplotlib is optional in the demo too)
OPTIONAL = ["httpx", "fastapi", "uvicorn", "datasets", "pyarrow", "peft", "accelerate",
            "tensorboard", "wandb", "trackio", "vllm", "matplotlib", "trl"]  # fmt: skip
BASE_PATHS = [
    "opd.cli.main",
    "opd.cli.demo.run",
    "opd.cli.cache",
    "opd.run.loop",
    "opd.run.setup",
    "opd.teachers.cache.generate",
    "opd.teachers.registry",
    "opd.evaluation.divergence",
]

SCRIPT = textwrap.dedent(
    """
    import importlib, sys

    # None in sys.modules: `import x` raises ImportError and importlib.util.find_spec(x)
    # answers None, as for a package that is not installed (transformers probes that way)
    for name in {optional!r}:
        sys.modules[name] = None
    for module in {paths!r}:
        importlib.import_module(module)
    print("ok")
    """
)


def test_base_paths_import_without_the_optional_extras():
    script = SCRIPT.format(optional=set(OPTIONAL), paths=BASE_PATHS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
