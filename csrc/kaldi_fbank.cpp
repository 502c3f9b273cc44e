// Batched Kaldi log-mel filterbank on CPU: torch.ops.sslam_fast_C.fbank (CPU implementation).
//
// Computes, for every frame of a padded batch, the same float32 arithmetic as torchaudio.compliance.kaldi.fbank with
// the EAT/SSLAM settings (snip_edges, DC removal, pre-emphasis 0.97 with replicate padding, window, zero padding to
// n_fft, |rFFT|^2, mel, log with an FLT_EPSILON floor), followed by an affine normalisation (x - shift) * scale.
//
// Pipeline. The frames of all rows form one flat list, processed in chunks of kChunk frames:
//   1. at::parallel_for: fill a (chunk, n_fft) buffer: framing, offset, DC removal, pre-emphasis, window (the zero
//      padding columns are written once, when the buffer is created);
//   2. one batched at::fft_rfft of the chunk (outside any parallel region);
//   3. at::parallel_for over groups of L frames (L = SIMD width: 16 on AVX-512, 8 on AVX2, 4 otherwise): power
//      spectrum, transposed in registers to bin-major / frame-minor layout so the sparse mel product (each filter
//      touches only its own contiguous bin range) runs with the L frames as vector lanes; log, normalisation,
//      transposed back and stored straight into the output.
// Frames past a row's own frame count (or past num_frames) are filled with (0 - shift) * scale.
//
// The kernel of stages 1 and 3, and how it reproduces torch's float32 arithmetic up to and including the FFT, is in
// csrc/kaldi_fbank_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "kaldi_fbank.h"

namespace sslam_fast::kaldi_fbank {
namespace {

void check_inputs(const at::Tensor& waveforms, const at::Tensor& lengths, const at::Tensor& offsets,
                  const at::Tensor& window, const at::Tensor& mel_banks, int64_t frame_length, int64_t frame_shift,
                  int64_t n_fft, int64_t num_frames, int64_t out_frames) {
  auto check = [](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const char* shape) {
    TORCH_CHECK(t.device().is_cpu(), "fbank: ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "fbank: ", name, " must have dtype ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == dim, "fbank: ", name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "fbank: ", name, " must be contiguous");
  };
  check(waveforms, "waveforms", at::kFloat, 2, "(B, N)");
  check(lengths, "lengths", at::kLong, 1, "(B,)");
  check(offsets, "offsets", at::kFloat, 1, "(B,)");
  check(window, "window", at::kFloat, 1, "(frame_length,)");
  check(mel_banks, "mel_banks", at::kFloat, 2, "(M, n_fft/2+1)");
  const int64_t batch = waveforms.size(0);
  TORCH_CHECK(lengths.size(0) == batch, "fbank: lengths must have shape (B,) = (", batch, ",), got ",
              lengths.sizes());
  TORCH_CHECK(offsets.size(0) == batch, "fbank: offsets must have shape (B,) = (", batch, ",), got ",
              offsets.sizes());
  // Sizes in range before the products below and before any allocation (csrc/checks.h).
  check_size("fbank", "frame_length", frame_length, 1);
  check_size("fbank", "frame_shift", frame_shift, 1);
  check_size("fbank", "num_frames", num_frames, 0);
  check_size("fbank", "out_frames", out_frames, 0);
  TORCH_CHECK(n_fft >= frame_length, "fbank: n_fft (", n_fft, ") must be at least frame_length (", frame_length,
              ")");
  check_size("fbank", "n_fft", n_fft, frame_length);
  TORCH_CHECK(window.size(0) == frame_length, "fbank: window must have frame_length = ", frame_length,
              " samples, got ", window.size(0));
  TORCH_CHECK(mel_banks.size(1) == n_fft / 2 + 1, "fbank: mel_banks must have n_fft/2+1 = ", n_fft / 2 + 1,
              " columns, got shape ", mel_banks.sizes());
  TORCH_CHECK(mel_banks.size(0) > 0, "fbank: mel_banks must have at least one filter, got shape ",
              mel_banks.sizes());
  // The (B, out_frames, M) output: out_frames is a free argument (eat_features' target_length), so its product
  // with the batch and the filters is bounded before at::empty (which would try to allocate it, then fill it).
  checked_mul("fbank", "the output rows * out_frames * mel filters",
              checked_mul("fbank", "the output rows * out_frames", batch, out_frames), mel_banks.size(0));
}

at::Tensor fbank_cpu(const at::Tensor& waveforms, const at::Tensor& lengths, const at::Tensor& offsets,
                     const at::Tensor& window, const at::Tensor& mel_banks, int64_t frame_length, int64_t frame_shift,
                     int64_t n_fft, int64_t num_frames, int64_t out_frames, double shift, double scale) {
  check_inputs(waveforms, lengths, offsets, window, mel_banks, frame_length, frame_shift, n_fft, num_frames,
               out_frames);
  const int64_t batch = waveforms.size(0);
  const int64_t samples = waveforms.size(1);
  const int64_t bins = n_fft / 2 + 1;
  const int64_t mels = mel_banks.size(0);
  const float shift_f = static_cast<float>(shift);
  const float scale_f = static_cast<float>(scale);
  const float pad_value = (0.0f - shift_f) * scale_f;

  // Frames computed per row: its own frame count, capped by num_frames and out_frames.
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t limit = std::min(num_frames, out_frames);
  std::vector<int64_t> computed(batch);
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= samples, "fbank: lengths[", b, "] = ", len[b],
                " is outside [0, N] with N = ", samples);
    const int64_t own = len[b] < frame_length ? 0 : 1 + (len[b] - frame_length) / frame_shift;
    computed[b] = std::min(own, limit);
    total += computed[b];
  }

  at::Tensor out = at::empty({batch, out_frames, mels}, waveforms.options());
  if (batch == 0 || out_frames == 0) return out;
  float* out_ptr = out.data_ptr<float>();

  // Padding frames: one contiguous run at the end of each row.
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      std::fill(out_ptr + (b * out_frames + computed[b]) * mels, out_ptr + (b + 1) * out_frames * mels, pad_value);
    }
  });
  if (total == 0) return out;

  // The flat frame list.
  std::vector<int64_t> src(total), dst(total);
  std::vector<float> frame_offset(total);
  const float* offsets_ptr = offsets.data_ptr<float>();
  for (int64_t b = 0, f = 0; b < batch; ++b) {
    for (int64_t t = 0; t < computed[b]; ++t, ++f) {
      src[f] = b * samples + t * frame_shift;
      dst[f] = (b * out_frames + t) * mels;
      frame_offset[f] = offsets_ptr[b];
    }
  }

  const Kernels& kern = kernels();
  const MelSpans spans = make_spans(mel_banks.data_ptr<float>(), mels, bins);
  const int64_t chunk = std::min(kChunk, total);
  at::Tensor frames = at::zeros({chunk, n_fft}, waveforms.options());  // columns >= frame_length stay zero

  Job job{};
  job.wave = waveforms.data_ptr<float>();
  job.window = window.data_ptr<float>();
  job.frame_length = frame_length;
  job.n_fft = n_fft;
  job.bins = bins;
  job.mels = mels;
  job.mean_width = torch_mean_width();
  job.mel = &spans;
  job.shift = shift_f;
  job.scale = scale_f;
  job.src = src.data();
  job.frame_offset = frame_offset.data();
  job.dst = dst.data();
  job.out = out_ptr;
  job.frames = frames.data_ptr<float>();

  const int lanes = kern.lanes;
  for (int64_t c0 = 0; c0 < total; c0 += chunk) {
    const int64_t count = std::min(chunk, total - c0);
    job.c0 = c0;
    at::parallel_for(0, count, 16, [&](int64_t lo, int64_t hi) { kern.fill(job, lo, hi); });
    at::Tensor spec = at::fft_rfft(count == chunk ? frames : frames.narrow(0, 0, count));
    if (!spec.is_contiguous()) spec = spec.contiguous();
    job.spec = reinterpret_cast<const float*>(spec.data_ptr<c10::complex<float>>());
    const int64_t groups = (count + lanes - 1) / lanes;
    at::parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scratch(bins * kMaxLanes);
      kern.mel(job, count, lo, hi, scratch.data());
    });
  }
  return out;
}

}  // namespace
}  // namespace sslam_fast::kaldi_fbank

TORCH_LIBRARY_FRAGMENT(sslam_fast_C, m) {
  m.def(
      "fbank(Tensor waveforms, Tensor lengths, Tensor offsets, Tensor window, Tensor mel_banks, "
      "int frame_length, int frame_shift, int n_fft, int num_frames, int out_frames, float shift, float scale) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(sslam_fast_C, CPU, m) { m.impl("fbank", &sslam_fast::kaldi_fbank::fbank_cpu); }
