// Pre-included (NVRTC --pre-include) ahead of every translation unit built with the NVSHMEM
// transport (KernelSpec.transport == "nvshmem"; see flashmoe/host/compile.py). It makes the
// NVSHMEM device headers compile under NVRTC and link against the wheel's libnvshmem_device.a.
// Verified with NVSHMEM 3.4.5 and 3.8.0 headers, NVRTC/nvJitLink 13.0, sm_80 and sm_90a.
#pragma once

// NVRTC has no C++ standard library: CCCL supplies cuda::std, but NVSHMEM 3.4.5's
// non_abi/device/coll/reduce.cuh and common/nvshmemi_common_device.cuh name std:: traits
// ("namespace std has no member is_integral / is_signed"). Alias exactly the names they use;
// NOTE: never alias tuple_size / tuple_element here, CCCL declares those in std under NVRTC.
#include <cuda/std/type_traits>
#include <cuda/std/utility>
namespace std {
using cuda::std::conditional;
using cuda::std::declval;
using cuda::std::enable_if;
using cuda::std::false_type;
using cuda::std::integral_constant;
using cuda::std::is_base_of;
using cuda::std::is_empty;
using cuda::std::is_floating_point;
using cuda::std::is_integral;
using cuda::std::is_same;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
using cuda::std::true_type;
}  // namespace std

// Inline every device transfer function into this translation unit, so libnvshmem_device.a only
// supplies nvshmemi_device_state_d and the version symbol. Without it, putmem_signal* calls an
// archive function whose mangled name never matches: NVRTC's uint64_t is unsigned long long
// ('y'), the nvcc-built archive's is unsigned long ('m') -> "Undefined reference to
// _Z37nvshmemi_transfer_put_signal_dispatch..." at link time.
// It must be defined before nvshmem_build_options.h is first included (3.8.0 keys its own
// NVRTC guards on it; defining it later fails on "cannot open source file stdio.h").
#ifndef NVSHMEM_ENABLE_ALL_DEVICE_INLINING
#define NVSHMEM_ENABLE_ALL_DEVICE_INLINING
#endif
#include <non_abi/nvshmem_build_options.h>

// The inlined IBGDA / GPUNetIO paths need <infiniband/mlx5dv.h>, which NVRTC cannot see; 3.8.0
// drops them itself under NVRTC, 3.4.5 does not. NVLink P2P and the proxy path remain.
#undef NVSHMEM_IBGDA_SUPPORT
#undef NVSHMEM_IBGDA_SUPPORT_GPUMEM_ONLY
#undef NVSHMEM_GPUNETIO_SUPPORT

// No calls in the kernel (ptx.cuh div_full says why): 3.8.0 keeps one proxy helper out of line
// (NVSHMEMI_NOINLINE); its device asserts, which call __assertfail, compile.py turns off (NDEBUG).
#define NVSHMEMI_NOINLINE __forceinline__
