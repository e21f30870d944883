"""Telugu full-duplex voice agent on Kyutai's Moshi.

Audio flows one way: client audio -> `audio` (resample, 1920-sample frames) -> `engine`
(one batched Mimi encode / LMGen step / Mimi decode per 80 ms) -> `session` -> client.
"""

import os
from pathlib import Path

# moshi wraps a few small kernels in torch.compile, decided when moshi is imported. On a CPU that
# costs ~15 s at the first step and is no faster at our sizes (measured: 31 ms vs 35 ms per batch-8
# tiny step), so CPU-only hosts skip it; GPU hosts keep it. NO_TORCH_COMPILE=0/1 overrides.
# The GPU is looked for by its driver, not through torch, so that light modules (the voice
# catalogue, the settings) import without pulling torch in.
_NVIDIA_DRIVER = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))  # host, or a container's devices
if "NO_TORCH_COMPILE" not in os.environ and not any(p.exists() for p in _NVIDIA_DRIVER):
    os.environ["NO_TORCH_COMPILE"] = "1"
elif os.environ.get("NO_TORCH_COMPILE") == "0":
    del os.environ["NO_TORCH_COMPILE"]

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # samples per Mimi frame: 80 ms at 24 kHz
FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE

# The catalogue, styles and corpora: `assets/` beside the package in a checkout; inside it
# (`agent/assets/`) in an installed wheel, where pyproject.toml maps the folder.
_PACKAGE = Path(__file__).resolve().parent
ASSETS = _PACKAGE / "assets" if (_PACKAGE / "assets").is_dir() else _PACKAGE.parent / "assets"
