// foveal_native::abi_version: the interface version of the native extension, so that the Python side can refuse a
// library built from another version of the sources' contract.
#include <torch/library.h>

namespace foveal {

int64_t abi_version() { return 1; }

}  // namespace foveal

TORCH_LIBRARY_FRAGMENT(foveal_native, m) {
  m.def("abi_version() -> int", &foveal::abi_version);
}
