"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# As the jaxlm commands do, before JAX's first computation: XLA:CPU's per-call buffers then come
# from memory the process keeps instead of fresh, page-faulting mmaps (sharding/host_memory.py).
from sharding.host_memory import keep_freed_host_memory  # noqa: E402

keep_freed_host_memory()
