// CPU path of the cpsl native core.
#include "cp.h"
#ifdef CPSL_WITH_OPENMP
#include <omp.h>
#endif

namespace cpsl {

int cpu_num_threads() {
#ifdef CPSL_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpsl
