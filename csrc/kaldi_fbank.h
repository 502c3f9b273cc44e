// The CPU kernel of torch.ops.sslam_fast_C.fbank (csrc/kaldi_fbank_kernel.cpp) as the op (csrc/kaldi_fbank.cpp)
// drives it: the two parallel stages of a chunk of frames, compiled per instruction set, and what they share.

#pragma once

#include <cstdint>
#include <vector>

namespace sslam_fast::kaldi_fbank {

constexpr int64_t kChunk = 256;  // frames per rFFT call: the chunk's buffers stay in L2
constexpr int kMaxLanes = 16;    // the widest SIMD group of frames (AVX-512)

// Sparse form of the dense (M, bins) filter matrix: filter m covers bins [first[m], first[m] + count[m]) with
// weights at weights[start[m] ...] (its first to its last nonzero; zero rows have count 0).
struct MelSpans {
  std::vector<int64_t> first, count, start;
  std::vector<float> weights;
};

MelSpans make_spans(const float* banks, int64_t mels, int64_t bins);

struct Job {
  // inputs
  const float* wave;
  const float* window;
  int64_t frame_length;
  int64_t n_fft;
  int64_t bins;
  int64_t mels;
  int mean_width;
  const MelSpans* mel;
  float shift;
  float scale;
  // flat frame list: first sample (offset into wave), row offset value, first output element
  const int64_t* src;
  const float* frame_offset;
  const int64_t* dst;
  float* out;
  // current chunk: frames [c0, c0 + count) of the flat list
  int64_t c0;
  float* frames;      // (chunk, n_fft) rFFT input
  const float* spec;  // (chunk, bins) complex, interleaved
};

// The stages for one instruction set: fill(job, lo, hi) frames [lo, hi) of the chunk into job.frames (stage 1);
// mel(job, count, glo, ghi, P) groups [glo, ghi) of `lanes` frames of the chunk's spectrum into the output (stage 3),
// with P bins * kMaxLanes floats of scratch.
struct Kernels {
  int lanes;
  void (*fill)(const Job&, int64_t, int64_t);
  void (*mel)(const Job&, int64_t, int64_t, int64_t, float*);
};

// The kernels for the widest instruction set this CPU supports (cpu_isa.h; SSLAM_FAST_CPU_ISA caps it).
const Kernels& kernels();

// The float vector width of torch's CPU sum kernel in this process (see kaldi_fbank_kernel.cpp). Call it outside
// parallel regions: the first call probes at::mean.
int torch_mean_width();

}  // namespace sslam_fast::kaldi_fbank
