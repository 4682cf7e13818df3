#define MMOC_INIT_ISA_NS isa_avx2
#include <bit>
#include "engine/model/normal_fill_kernels.inc"
