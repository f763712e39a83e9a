// RMS normalisation of a row (host and device code), with the weight forms the model families use:
//   scale           (x * r) * w          Gemma 4 (the weight folded into the checkpoints)
//   scale_plus_one  (x * r) * (1 + w)    Gemma 3 and the Gemma text decoders
//   rms             x * r                a weightless RMS ("L2") norm: Gemma 4's v norm, Llama 4's q/k
//   none            x                    no normalisation
// where r = 1 / sqrt(mean(x^2) + eps), everything in the accumulation type, rounded once to the
// storage dtype afterwards (HF's `normed.type_as(x)`).
#pragma once

#include <string>

#include "vitops/common.h"
#include "vitops/device_math.h"

namespace vitops::norm {

enum class Kind : int32_t { Scale = 0, ScalePlusOne = 1, Rms = 2, None = 3 };

VITOPS_HOST_DEVICE bool has_weight(Kind k) { return k == Kind::Scale || k == Kind::ScalePlusOne; }
VITOPS_HOST_DEVICE bool normalizes(Kind k) { return k != Kind::None; }

// Gemma's factor torch.pow(mean(x^2) + eps, -0.5). torch.pow special-cases the exponent -0.5 as a
// reciprocal square root, which on the CPU is exactly 1 / sqrt(x) (correctly rounded sqrt, then a
// division); a generic powf differs from it in the last bit for about a third of all inputs. Same
// expression on CUDA (IEEE sqrtf and division by default).
template <typename acc>
VITOPS_HOST_DEVICE acc inverse_rms(acc sum_of_squares, int64_t width, acc eps) {
  const acc mean_squared = sum_of_squares / static_cast<acc>(width) + eps;
  return acc(1) / math_sqrt(mean_squared);
}

// The weight factor of channel e as the kernels keep it (w, or 1 + w added once in acc).
template <typename acc>
VITOPS_HOST_DEVICE acc weight_factor(Kind k, acc w) {
  return k == Kind::ScalePlusOne ? acc(1) + w : w;
}

inline Kind parse_kind(const char* op, const std::string& name) {
  if (name == "scale") return Kind::Scale;
  if (name == "scale_plus_one") return Kind::ScalePlusOne;
  if (name == "rms") return Kind::Rms;
  if (name == "none") return Kind::None;
  detail::fail("vitops.", op, ": `norm` must be \"scale\" (x * w), \"scale_plus_one\" (x * (1 + w)), \"rms\" ",
               "(no weight) or \"none\", got \"", name, "\"");
}

}  // namespace vitops::norm
