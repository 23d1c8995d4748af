"""Make PyPI's torchvision import next to the CPU build of torch (run by ``make``; idempotent).

PyPI's Linux torchvision wheels are CUDA builds: next to torch+cpu their C++ ops
(``_C.so`` links ``libtorch_cuda``) do not load. torchvision's Python side is meant to
survive that (its ops then raise "Couldn't load custom C++ ops"), but 0.28 registers fake
kernels for ``nms`` and ``qnms`` unconditionally, and that fails at ``import torchvision``.
This guards those two registrations the way torchvision guards the others. foveal needs
torchvision only because timm imports it (transforms); no torchvision op is used.
"""

import importlib.util
import pathlib
import sys

MARK = "def _fake_if_ops(name):"
HELPER = f'''

{MARK}
    # added by foveal's tools/torchvision_cpu.py: a CUDA torchvision's C++ ops do not load with a CPU torch
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    src = path.read_text()
    if MARK in src:
        return 0
    anchor = "\n\n@functools.lru_cache(None)\ndef get_meta_lib"
    if anchor not in src or '@torch.library.register_fake("torchvision::' not in src:
        print(f"{path}: not the torchvision this script knows (0.28); left as it is", file=sys.stderr)
        return 1
    src = src.replace('@torch.library.register_fake("torchvision::', '@_fake_if_ops("torchvision::')
    path.write_text(src.replace(anchor, HELPER + anchor, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
