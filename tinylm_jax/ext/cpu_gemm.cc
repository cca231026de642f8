// bf16 x bf16 -> f32 matrix products through a vendor GEMM, as an XLA FFI handler (jax.ffi).
//
// The library is not linked: Python loads it at run time (`tinylm_jax.core.cpu_gemm`) and hands
// this file the address of its `cblas_gemm_bf16bf16f32` (MKL's signature, LP64), so the
// extension builds on any machine with a C++ compiler and jaxlib's headers, and a machine
// without the library keeps XLA's own products.
//
// One handler serves every product of the fast path: out (..., M, N) = op(a) @ op(b), where
// op transposes the last two dims when asked (the GEMM reads the transpose in place, so the
// backward pass needs no copies) and any leading dims are a batch, looped here.

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS's constants.
constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

using GemmBf16 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc);

GemmBf16 gemm = nullptr;

ffi::Error Bf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                    ffi::ResultBuffer<ffi::F32> out, bool trans_a, bool trans_b) {
  if (gemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "tinylm_bf16_gemm: no GEMM loaded");
  }
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  auto out_dims = out->dimensions();
  const size_t rank = a_dims.size();
  if (rank < 2 || b_dims.size() != rank || out_dims.size() != rank) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "tinylm_bf16_gemm: ranks differ");
  }
  const int64_t a_rows = a_dims[rank - 2], a_cols = a_dims[rank - 1];
  const int64_t b_rows = b_dims[rank - 2], b_cols = b_dims[rank - 1];
  const int64_t m = trans_a ? a_cols : a_rows, k = trans_a ? a_rows : a_cols;
  const int64_t n = trans_b ? b_rows : b_cols;
  if ((trans_b ? b_cols : b_rows) != k || out_dims[rank - 2] != m || out_dims[rank - 1] != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "tinylm_bf16_gemm: shapes differ");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) batch *= a_dims[i];
  const auto* a_data = reinterpret_cast<const uint16_t*>(a.typed_data());
  const auto* b_data = reinterpret_cast<const uint16_t*>(b.typed_data());
  float* out_data = out->typed_data();
  for (int64_t i = 0; i < batch; ++i) {
    gemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
         static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
         a_data + i * a_rows * a_cols, static_cast<int>(a_cols),
         b_data + i * b_rows * b_cols, static_cast<int>(b_cols), 0.0f,
         out_data + i * m * n, static_cast<int>(n));
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void tinylm_set_gemm(void* function) { gemm = reinterpret_cast<GemmBf16>(function); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(TinylmBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
