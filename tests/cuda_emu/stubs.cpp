// The entry points of launchers.h that tests/cuda_emu does not emulate (the
// sparse and quant kernels use shared memory tiles, warp shuffles and tensor
// cores), plus the runtime queries, so that csrc/bind_cuda.cpp links as is.
#include <stdexcept>
#include <string>

#include "cuda/launchers.h"

namespace pyopt {
namespace cuda {

static void not_emulated(const char* name) {
  throw std::runtime_error(std::string("tests/cuda_emu: ") + name + " is not emulated");
}

void sparse_csr_linear(int64_t, int64_t, int64_t, int64_t, int64_t, int, int64_t, int64_t,
                       int64_t, int64_t, int, int64_t) {
  not_emulated("sparse_csr_linear");
}
void sparse_bitmask_linear(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int, int64_t) {
  not_emulated("sparse_bitmask_linear");
}
void sparse_bsr_linear(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int, int64_t) {
  not_emulated("sparse_bsr_linear");
}
void quant_linear(int64_t, int64_t, int64_t, int, int64_t, int64_t, int64_t, int64_t, int64_t,
                  int64_t, int64_t, int, int, int64_t, int64_t, int64_t, int64_t) {
  not_emulated("quant_linear");
}
int device_count() noexcept { return 1; }
std::string runtime_error() { return ""; }
std::string cuda_version() { return "emulated"; }
std::string cuda_archs() { return "host"; }

}  // namespace cuda
}  // namespace pyopt
