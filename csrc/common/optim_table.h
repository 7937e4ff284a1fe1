// The address table that Python (pyopt/_checks.py) builds for one optimizer
// call. One row per tensor, int64 each; rows are validated in Python before the
// table's address reaches native code.
//
// Every table ends with a mask column: a bool/uint8 tensor of the param's
// shape and layout; positions where it is 0 are written as exact zeros in the
// param and every state list after the update (pruned weights stay pruned),
// and an out column: with fp32 master weights, column 0 is the fp32 master,
// the grad is 16-bit, and the out column is the 16-bit param that receives
// the rounded master after the update.
#pragma once
#include <cstdint>

namespace pyopt {

enum AdamCol : int {
  kAdamParam = 0,     // param data (param dtype)
  kAdamGrad = 1,      // grad data (param dtype)
  kAdamExpAvg = 2,    // exp_avg (state dtype)
  kAdamExpAvgSq = 3,  // exp_avg_sq (state dtype)
  kAdamMaxExpAvgSq = 4,  // max_exp_avg_sq (state dtype), 0 unless amsgrad
  kAdamStep = 5,      // host address of the float32 CPU step tensor
  kAdamNumel = 6,     // element count
  kAdamMask = 7,      // uint8/bool mask (0 = pruned), 0 when the param has none
  kAdamOut = 8,       // with fp32 master weights: the 16-bit param (column 0 is the master)
  kAdamCols = 9,
};

enum SgdCol : int {
  kSgdParam = 0,      // param data
  kSgdGrad = 1,       // grad data (param dtype)
  kSgdMomentum = 2,   // momentum_buffer (param dtype), 0 without momentum
  kSgdFirst = 3,      // 1: the buffer is new and starts as a copy of the gradient
  kSgdNumel = 4,
  kSgdMask = 5,
  kSgdOut = 6,
  kSgdCols = 7,
};

enum RmspropCol : int {
  kRmsParam = 0,      // param data
  kRmsGrad = 1,       // grad data (param dtype)
  kRmsSquareAvg = 2,  // square_avg (param dtype)
  kRmsMomentum = 3,   // momentum_buffer, 0 without momentum
  kRmsGradAvg = 4,    // grad_avg, 0 unless centered
  kRmsStep = 5,       // host address of the float32 CPU step tensor
  kRmsNumel = 6,
  kRmsMask = 7,
  kRmsOut = 8,
  kRmsCols = 9,
};

// Gradient clipping: one row per grad.
enum NormCol : int {
  kNormGrad = 0,      // grad data
  kNormNumel = 1,
  kNormCols = 2,
};

}  // namespace pyopt
