"""What the compiled extensions were built with: OpenMP or not, and its thread limit."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fastlstm_openmp_enabled(void) { return 1; }
    static int fastlstm_openmp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fastlstm_openmp_enabled(void) { return 0; }
    static int fastlstm_openmp_max_threads(void) { return 1; }
    #endif
    """
    int fastlstm_openmp_enabled()
    int fastlstm_openmp_max_threads()


def openmp_enabled():
    """True when the extensions were compiled with OpenMP."""
    return bool(fastlstm_openmp_enabled())


def openmp_max_threads():
    """OpenMP's default team size in this process (1 without OpenMP)."""
    return fastlstm_openmp_max_threads()
