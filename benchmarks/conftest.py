"""pytest configuration for the microbenchmarks: `pytest benchmarks --benchmark-only`.

Import-safe without a GPU, and sets nothing in the environment (in particular not
TRITON_INTERPRET: Triton runs here only on CUDA). Makes the repository root importable so the
test files can `import benchmarks.micro` however pytest was started."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
