// CUDA implementation of sslam_fast_C::fbank (schema and semantics in csrc/kaldi_fbank.cpp).
//
// Three steps, the FFT in cuFFT through ATen rather than hand-written:
//   1. frame_kernel: one block per frame: subtract the row offset, remove the frame mean (block reduction),
//      pre-emphasis (x[-1] := x[0]), Hann window, zero-pad to n_fft -> (frames, n_fft) fp32 buffer.
//   2. at::fft_rfft over the buffer (cuFFT, fp32, batched).
//   3. mel_kernel: one block per output frame: |X|^2 of the bins into shared memory, then each filter sums only its
//      own contiguous bin range (each bin feeds at most two filters), log(max(E, eps)), (x - shift) * scale, store;
//      frames past a row's count (or past num_frames) get (0 - shift) * scale.
// This path is exact fp32 (no TF32 DFT); the Triton kernel is the fused, faster one on the GPU.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../checks.h"

namespace sslam_fast {
namespace {

constexpr float kPreemphasis = 0.97f;
constexpr float kLogFloor = 1.1920928955078125e-07f;  // float32 epsilon, torchaudio's floor

__device__ __forceinline__ int64_t frames_of(int64_t length, int64_t frame_length, int64_t frame_shift) {
  return length < frame_length ? 0 : 1 + (length - frame_length) / frame_shift;
}

__global__ void frame_kernel(const float* __restrict__ wave, const int64_t* __restrict__ lengths,
                             const float* __restrict__ offsets, const float* __restrict__ window,
                             float* __restrict__ frames, int64_t n_samples, int64_t n_rows_frames,
                             int64_t frame_length, int64_t frame_shift, int64_t n_fft) {
  const int64_t f = blockIdx.x;  // frame index in [0, B * T)
  const int64_t b = f / n_rows_frames;
  const int64_t t = f % n_rows_frames;
  float* out = frames + f * n_fft;
  const bool valid = t < frames_of(lengths[b], frame_length, frame_shift);
  const float* src = wave + b * n_samples + t * frame_shift;
  const float off = offsets[b];

  extern __shared__ float smem[];  // frame_length samples + 32 partial sums
  float* y = smem;
  float* partial = smem + frame_length;
  float local = 0.f;
  for (int64_t j = threadIdx.x; j < frame_length; j += blockDim.x) {
    const float v = valid ? src[j] - off : 0.f;
    y[j] = v;
    local += v;
  }
  for (int d = 16; d > 0; d >>= 1) local += __shfl_down_sync(0xffffffff, local, d);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = local;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < (blockDim.x + 31) / 32 ? partial[threadIdx.x] : 0.f;
    for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffff, s, d);
    if (threadIdx.x == 0) partial[0] = s / static_cast<float>(frame_length);
  }
  __syncthreads();
  const float mean = partial[0];
  for (int64_t j = threadIdx.x; j < n_fft; j += blockDim.x) {
    float v = 0.f;
    if (valid && j < frame_length) {
      const float cur = y[j] - mean;
      const float prev = (j == 0 ? y[0] : y[j - 1]) - mean;
      v = (cur - kPreemphasis * prev) * window[j];
    }
    out[j] = v;
  }
}

__global__ void mel_kernel(const float2* __restrict__ spectrum, const int64_t* __restrict__ lengths,
                           const float* __restrict__ banks, const int* __restrict__ first, const int* __restrict__ last,
                           float* __restrict__ out, int64_t n_rows_frames, int64_t out_frames, int64_t n_bins,
                           int64_t n_mels, int64_t frame_length, int64_t frame_shift, float shift, float scale) {
  const int64_t b = blockIdx.y;
  const int64_t t = blockIdx.x;
  float* dst = out + (b * out_frames + t) * n_mels;
  const bool valid = t < n_rows_frames && t < frames_of(lengths[b], frame_length, frame_shift);
  if (!valid) {
    for (int64_t m = threadIdx.x; m < n_mels; m += blockDim.x) dst[m] = (0.f - shift) * scale;
    return;
  }
  extern __shared__ float power[];
  const float2* row = spectrum + (b * n_rows_frames + t) * n_bins;
  for (int64_t k = threadIdx.x; k < n_bins; k += blockDim.x) {
    const float2 c = row[k];
    power[k] = c.x * c.x + c.y * c.y;
  }
  __syncthreads();
  for (int64_t m = threadIdx.x; m < n_mels; m += blockDim.x) {
    float e = 0.f;
    const float* w = banks + m * n_bins;
    for (int k = first[m]; k <= last[m]; ++k) e += w[k] * power[k];
    dst[m] = (logf(fmaxf(e, kLogFloor)) - shift) * scale;
  }
}

// First and last nonzero bin of each filter (last < first for an all-zero filter).
std::pair<at::Tensor, at::Tensor> filter_ranges(const at::Tensor& banks) {
  const auto nz = banks.ne(0);
  const auto n_bins = banks.size(1);
  const auto idx = at::arange(n_bins, banks.options().dtype(at::kInt)).unsqueeze(0).expand_as(banks);
  const auto first = at::where(nz, idx, at::full_like(idx, static_cast<int>(n_bins))).amin(1).to(at::kInt);
  const auto last = at::where(nz, idx, at::full_like(idx, -1)).amax(1).to(at::kInt);
  return {first.contiguous(), last.contiguous()};
}

}  // namespace

at::Tensor fbank_cuda(const at::Tensor& waveforms, const at::Tensor& lengths, const at::Tensor& offsets,
                      const at::Tensor& window, const at::Tensor& mel_banks, int64_t frame_length,
                      int64_t frame_shift, int64_t n_fft, int64_t num_frames, int64_t out_frames, double shift,
                      double scale) {
  TORCH_CHECK(waveforms.is_cuda() && waveforms.dim() == 2 && waveforms.scalar_type() == at::kFloat &&
                  waveforms.is_contiguous(),
              "waveforms must be a contiguous (B, N) float32 CUDA tensor");
  TORCH_CHECK(lengths.is_cuda() && lengths.scalar_type() == at::kLong && lengths.numel() == waveforms.size(0),
              "lengths must be a (B,) int64 CUDA tensor");
  TORCH_CHECK(offsets.is_cuda() && offsets.scalar_type() == at::kFloat && offsets.numel() == waveforms.size(0),
              "offsets must be a (B,) float32 CUDA tensor");
  TORCH_CHECK(window.is_cuda() && window.numel() == frame_length && window.scalar_type() == at::kFloat,
              "window must be a (frame_length,) float32 CUDA tensor");
  TORCH_CHECK(mel_banks.is_cuda() && mel_banks.dim() == 2 && mel_banks.size(1) == n_fft / 2 + 1 &&
                  mel_banks.scalar_type() == at::kFloat,
              "mel_banks must be a (M, n_fft/2+1) float32 CUDA tensor");
  // Sizes in range before any product and any allocation (csrc/checks.h), then the launch limits: a launch the
  // driver refuses would raise too, but only after the output and frame buffers were allocated, and with a message
  // ("invalid argument") that names no argument.
  constexpr const char* op = "fbank_cuda";
  check_size(op, "frame_length", frame_length, 1);
  check_size(op, "frame_shift", frame_shift, 1);
  check_size(op, "num_frames", num_frames, 0);
  check_size(op, "out_frames", out_frames, 0);
  TORCH_CHECK(n_fft >= frame_length, op, ": n_fft (", n_fft, ") must be at least frame_length (", frame_length, ")");
  check_size(op, "n_fft", n_fft, frame_length);
  const int64_t B = waveforms.size(0);
  const int64_t M = mel_banks.size(0);
  const int64_t T = std::min(num_frames, out_frames);
  // B * T <= B * out_frames also bounds the frame buffer's rows and frame_kernel's grid (<= 2^31 - 1 blocks).
  const int64_t rows_frames = checked_mul(op, "the output rows * out_frames", B, out_frames);
  checked_mul(op, "the output rows * out_frames * mel filters", rows_frames, M);
  const c10::cuda::CUDAGuard guard(waveforms.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(B <= prop->maxGridSize[1], op, ": the batch (", B, " rows) exceeds the launch grid's y limit (",
              prop->maxGridSize[1], ")");
  const size_t smem_limit = prop->sharedMemPerBlock;
  TORCH_CHECK(static_cast<size_t>(frame_length + 32) * sizeof(float) <= smem_limit, op, ": frame_length (",
              frame_length, " samples) does not fit the kernel's shared memory (", smem_limit, " bytes a block)");
  TORCH_CHECK(static_cast<size_t>(n_fft / 2 + 1) * sizeof(float) <= smem_limit, op, ": n_fft (", n_fft,
              ") gives more bins than the kernel's shared memory holds (", smem_limit, " bytes a block)");
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty({B, out_frames, M}, waveforms.options());
  if (B == 0 || out_frames == 0) return out;

  const auto wave = waveforms.contiguous();
  const auto win = window.contiguous();
  const auto banks = mel_banks.contiguous();
  const auto [first, last] = filter_ranges(banks);
  at::Tensor spectrum;
  if (T > 0) {
    auto frames = at::empty({B * T, n_fft}, waveforms.options());
    const int threads = 128;
    const size_t smem = (frame_length + 32) * sizeof(float);
    frame_kernel<<<B * T, threads, smem, stream>>>(wave.data_ptr<float>(), lengths.data_ptr<int64_t>(),
                                                   offsets.data_ptr<float>(), win.data_ptr<float>(),
                                                   frames.data_ptr<float>(), wave.size(1), T, frame_length,
                                                   frame_shift, n_fft);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    spectrum = at::fft_rfft(frames, c10::nullopt, -1).contiguous();  // (B*T, n_fft/2+1) complex64
  } else {
    spectrum = at::zeros({1, n_fft / 2 + 1}, waveforms.options().dtype(at::kComplexFloat));
  }
  const int64_t n_bins = n_fft / 2 + 1;
  const dim3 grid(out_frames, B);
  mel_kernel<<<grid, 128, n_bins * sizeof(float), stream>>>(
      reinterpret_cast<const float2*>(spectrum.data_ptr<c10::complex<float>>()), lengths.data_ptr<int64_t>(),
      banks.data_ptr<float>(), first.data_ptr<int>(), last.data_ptr<int>(), out.data_ptr<float>(), T, out_frames,
      n_bins, M, frame_length, frame_shift, static_cast<float>(shift), static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sslam_fast_C, CUDA, m) { m.impl("fbank", &fbank_cuda); }

}  // namespace sslam_fast
