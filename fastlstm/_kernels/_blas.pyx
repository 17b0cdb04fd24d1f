"""Row-major BLAS helpers: the only place fastlstm calls BLAS from compiled code.

BLAS is column-major; a row-major matrix is the column-major matrix of its transpose, so
row-major ``C = op(A) @ op(B)`` is column-major ``C.T = op(B).T @ op(A).T``: the operands swap
places and m, n swap. All matrices are row-major with leading dimension (row length) lda, ldb,
ldc. The calls run on whatever threads the caller is on; callers inside a parallel region keep
BLAS to one thread (fastlstm._threads.blas_threads(1)).

The tests check the helper against NumPy through `_check_gemm`.
"""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm


cdef void gemm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
               const floating *A, int lda, const floating *B, int ldb, floating beta,
               floating *C, int ldc) noexcept nogil:
    """C = alpha * op(A) @ op(B) + beta * C; op(A) is (m, k), op(B) is (k, n), C is (m, n)."""
    cdef char trans_b_char = b"T" if trans_b else b"N"
    cdef char trans_a_char = b"T" if trans_a else b"N"
    if m <= 0 or n <= 0:
        return
    if floating is float:
        sgemm(&trans_b_char, &trans_a_char, &n, &m, &k, &alpha, <float *> B, &ldb,
              <float *> A, &lda, &beta, C, &ldc)
    else:
        dgemm(&trans_b_char, &trans_a_char, &n, &m, &k, &alpha, <double *> B, &ldb,
              <double *> A, &lda, &beta, C, &ldc)


def _check_gemm(bint trans_a, bint trans_b, double alpha, const floating[:, ::1] A,
                const floating[:, ::1] B, double beta, floating[:, ::1] C):
    """Test entry point: C = alpha * op(A) @ op(B) + beta * C, in place."""
    cdef int m = C.shape[0], n = C.shape[1]
    cdef int k = A.shape[0] if trans_a else A.shape[1]
    with nogil:
        gemm(trans_a, trans_b, m, n, k, <floating> alpha, &A[0, 0], A.shape[1], &B[0, 0],
             B.shape[1], <floating> beta, &C[0, 0], C.shape[1])
