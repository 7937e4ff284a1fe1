// The address table that Python (pyopt/_checks.py) builds for one optimizer
// call. One row per tensor, int64 each; rows are validated in Python before the
// table's address reaches native code.
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
  kAdamCols = 7,
};

}  // namespace pyopt
