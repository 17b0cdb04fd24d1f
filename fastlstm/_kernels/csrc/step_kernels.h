/* Names for the streaming step (`stacked_step` in _lstm_cython.pyx): the register tile of
 * lstm_kernels_impl.h, C (mr x 2·LANES) (+)= A (mr x K) @ panel (K x 2·LANES), in the build
 * that lstm_kernels.h picks at run time. */
#ifndef FASTLSTM_STEP_KERNELS_H
#define FASTLSTM_STEP_KERNELS_H

#include "lstm_kernels.h"

#define fastlstm_gemm_tile_f32 FASTLSTM_PICK(gemm_tile, f32)
#define fastlstm_gemm_tile_f64 FASTLSTM_PICK(gemm_tile, f64)

#endif /* FASTLSTM_STEP_KERNELS_H */
