// The blend's largest-deficit rule (nemotron.data.blended.build_blending_indices, its reference),
// compiled: sample i goes to the dataset d maximising weights[d] * max(i, 1) - drawn[d], the first
// on ties, in double precision. Built at first use by nemotron.data.blend_index (through
// torch.utils.cpp_extension) with -ffp-contract=off: a fused multiply-subtract would round once
// instead of twice and could pick another dataset than the Python rule does.
//
// Plain C ABI (loaded with ctypes): no torch or Python headers, so it compiles in about a second.
// The outputs are the caller's final numpy arrays, written in place.

#include <cstdint>

namespace {

template <typename Index>
void blend(const double* weights, const int64_t* ids, int64_t num, int64_t size, Index* dataset_index,
           int64_t* sample_index, int64_t* drawn) {
  for (int64_t d = 0; d < num; ++d) drawn[d] = 0;
  for (int64_t i = 0; i < size; ++i) {
    const double scale = static_cast<double>(i > 1 ? i : 1);
    int64_t best = 0;
    double best_error = weights[0] * scale - static_cast<double>(drawn[0]);
    for (int64_t d = 1; d < num; ++d) {
      const double error = weights[d] * scale - static_cast<double>(drawn[d]);
      if (error > best_error) {
        best = d;
        best_error = error;
      }
    }
    dataset_index[i] = static_cast<Index>(ids[best]);
    sample_index[i] = drawn[best]++;
  }
}

}  // namespace

extern "C" {

// weights[num] (normalised, all > 0), ids[num] (the dataset each weight is), drawn[num] scratch.
void nemotron_blend_int16(const double* weights, const int64_t* ids, int64_t num, int64_t size,
                          int16_t* dataset_index, int64_t* sample_index, int64_t* drawn) {
  blend(weights, ids, num, size, dataset_index, sample_index, drawn);
}

void nemotron_blend_int64(const double* weights, const int64_t* ids, int64_t num, int64_t size,
                          int64_t* dataset_index, int64_t* sample_index, int64_t* drawn) {
  blend(weights, ids, num, size, dataset_index, sample_index, drawn);
}

}
